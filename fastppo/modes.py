"""Every mode name of the loss layer, in one place: aggregations, KL estimators, policy losses and
rollout-correction modes, with the integer ids the kernels take as constexprs."""

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm", "token-sum")
AGG_IDS = {name: i for i, name in enumerate(AGG_MODES)}
# the entropy term's own aggregation (LossOptions.entropy_agg; None: the loss's agg)
ENTROPY_AGG_MODES = ("token-mean",)

KL_KINDS = ("k1", "abs", "k2", "mse", "k3", "low_var_kl")
KL_KIND_IDS = {"k1": 1, "abs": 2, "k2": 3, "mse": 3, "k3": 4, "low_var_kl": 5}   # 0: no KL term

POLICY_LOSSES = ("ppo", "gspo", "gspo_token", "cispo", "sapo", "gmpo", "gpg", "dppo_tv", "dppo_kl", "dro", "clip_cov",
                 "kl_cov", "vespo")
COV_LOSSES = ("clip_cov", "kl_cov")   # a batch-global token selection by covariance rank (verl)
POLICY_LOSS_IDS = {name: i for i, name in enumerate(POLICY_LOSSES)}

IS_LEVELS = ("token", "sequence")
IS_MODES = ("truncate", "mask")

# fastppo.rollout_correction: IS weight modes (TIS, IcePop, seq-mask-tis) and verl's rejection options
ROLLOUT_IS_MODES = ("truncate", "mask", "seq-mask")
ROLLOUT_IS_GATES = ("ratio", "binary_kl", "tv")   # the statistic mask / seq-mask gate on (OpenRLHF's gating)
REJECTION_OPTIONS = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
                     "seq_mean_k1", "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")
