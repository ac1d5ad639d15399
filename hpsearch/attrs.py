"""Names of the attributes hpsearch records on trials and studies (what the dashboard shows,
what ``optuna.load_study`` users read). Everything that writes or reads one imports it here.
"""

# ---- trial user attributes
ARCHITECTURE = "architecture"  # also the name of the architecture parameter
N_PARAMS = "n_params"
BEST_EPOCH = "best_epoch"
BEST_VALUE = "best_value"
CHECKPOINT = "checkpoint"  # path relative to the results folder, or a note once deleted
CHECKPOINT_SHA256 = "checkpoint_sha256"
CHECKPOINT_ARTIFACT = "checkpoint_artifact"
STORE_KEY = "store_key"  # a shared store: the prefix of the ids of this trial's files
DEVICE = "device"
WORKER = "worker"
TRAIN_SECONDS = "train_seconds"
HISTORY = "history"
RESUMED_FROM = "resumed_from"
RETRIED_AS = "retried_as"
FAIL_REASON = "fail_reason"
TRACEBACK = "traceback"
PRUNE_REASON = "prune_reason"

# ---- trial system attributes (the retry chain, in the shape Optuna's own retry uses)
RETRY_HISTORY = "retry_history"
FAILED_TRIAL = "failed_trial"
RETRIES = "hpsearch_retries"
HEARTBEAT = "hpsearch:heartbeat"  # {host, pid, parent, time}: liveness kept in a journal storage

# ---- study user attributes
STUDY_ENQUEUED = "hpsearch_enqueued"
STUDY_METRIC = "metric"
STUDY_RESULTS_DIR = "results_dir"
STUDY_BEST_ARTIFACT = "best_checkpoint_artifact"
STUDY_BEST_TRIAL = "best_checkpoint_trial"

# ---- study system attributes
RETIRED_ARTIFACT_PREFIX = "hpsearch:retired_artifact:"
RETIRED_CHECKPOINT_PREFIX = "hpsearch:retired_checkpoint:"  # + trial number: its files deleted
STUDY_CONFIG = "hpsearch:config"  # a shared store: the study file, so any machine finds it
STUDY_BEST_RECORD = "hpsearch:best"  # a shared store: the study best, decided here
STORE_CLEARED_PREFIX = "hpsearch:store_cleared:"  # + trial number: its stored files gone
EXPLORATION_SEED = "hpsearch:exploration_seed"  # an unseeded study's design, drawn once
