"""One trial as its own flow run (``sweep.dispatch: deployment``): any worker of the pool can take it.

The sweep asks Optuna for the trial and starts this flow through the ``trial`` deployment with plain ids and
the config, whose pretrained start is a ``models:/`` URI. Here the start is fetched (once per machine, by
digest), the data prepared, and `run_trial` does the rest, telling Optuna the end itself; the trial's
heartbeat comes from this process, so a lost worker shows as a stale trial.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from soups.config import PipelineConfig
from soups.runtime import resolve_device
from soups.train import prepare_finetune
from tasks.adapters.starts import fetched_start
from tasks.adapters.studies import TrialHeartbeats, open_trial
from tasks.adapters.tracking import client_for
from tasks.trial import TrialRef, fail_trial, run_trial


@flow(name="trial", flow_run_name="trial-{ref.study_name}-{ref.number}", log_prints=True)
def trial_flow(config: PipelineConfig, ref: TrialRef, params: dict[str, Any]) -> None:
    tracking = config.tracking
    trial = open_trial(
        tracking.resolved_optuna_storage(), ref.study_name, ref.trial_id, False, config.sweep.heartbeat_seconds
    )
    with TrialHeartbeats(trial.study) as heartbeats:
        heartbeats.add(trial)
        try:
            config = fetched_start(config, client_for(tracking))
            decoded = config.tracking.resolved_cache_dir() / "decoded"
            inputs = prepare_finetune(config.finetune_config(), resolve_device(config.train.device), decoded)
        except BaseException as err:
            fail_trial(trial, err)
            raise
        run_trial(config, ref, params, inputs)
