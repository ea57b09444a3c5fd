"""``resume``: the run's arguments come from its checkpoint; a command may change only runtime settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cytoretrieve.errors import CytoError
from cytoretrieve.train import checkpoint as ckpt
from cytoretrieve.train.config import RUNTIME, TrainConfig, conflicts


def resume_config(out: str | Path, given: dict[str, Any]) -> TrainConfig:
    """The checkpoint's TrainConfig with the runtime settings of `given` (workers, device, max-steps...) applied;
    CytoError when `given` sets a hyperparameter to another value than the checkpoint's."""
    out = Path(out).expanduser()
    state = ckpt.load(out / ckpt.LAST)
    saved = TrainConfig.from_dict(dict(state["args"]))
    clash = conflicts(saved, given)
    if clash:
        raise CytoError(
            f"`resume` continues the run as it was started; these differ from its checkpoint: {'; '.join(clash)}"
            " (start a new run in another `out` to change them)"
        )
    values = saved.to_dict()
    values.update({k: v for k, v in given.items() if k in RUNTIME and v is not None})
    values["out"] = str(out)
    config = TrainConfig.from_dict(values)
    config.validate()
    return config
