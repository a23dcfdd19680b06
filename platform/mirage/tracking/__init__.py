"""Every MLflow call of the platform: runs, metrics and artifacts (:mod:`.runs`), the model
registry and its champion alias (:mod:`.registry`), model URIs and downloads (:mod:`.models`), the
pyfunc wrapper of a logged model (:mod:`.pyfunc`), and a training run's MLflow model, dataset inputs
and figures (:mod:`.trained`).

Each call takes the store's absolute URI (``cfg.tracking.uri``) or the config itself and goes
through an ``MlflowClient`` bound to it; no module outside this package imports MLflow.
"""

from mirage.tracking.models import (
    check_model_uri,
    download_model,
    download_run_artifacts,
    load_predictor,
)
from mirage.tracking.registry import (
    SCORE_TAG,
    ChampionDecision,
    current_champion,
    decide_champion,
    log_pyfunc_model,
    register_pyfunc_model,
    update_champion,
)
from mirage.tracking.runs import (
    KINDS,
    EpochLogger,
    artifact_root,
    child_runs,
    client,
    close_stale_children,
    code_version,
    end_run,
    ensure_experiment,
    finish_trial_runs,
    git_commit,
    log_artifacts,
    log_config,
    log_metrics,
    reopen_run,
    run_tags,
    set_tags,
    source_tags,
    start_run,
    status_for,
    tracked_run,
)
from mirage.tracking.trained import (
    MODEL_URI_TAG,
    TRAINED_MODEL,
    feature_dataset,
    fmri_dataset,
    log_dataset_inputs,
    log_figure,
    log_trained_model,
)
