"""The MIL slide-scoring methods `score --method` accepts: name -> `MILMethod` record.

Adding a method is one `register_mil_method` call: a fit function (training bags, annotated positives, config ->
a scorer whose `predict(bags)` gives (slide scores, tile scores per slide)) and a line of help. Cross-validation
(`evaluate.py`), `score_table` and the CLI look methods up here and nowhere else. Light to import: each fit
function imports what it needs (torch, FAISS), so the CLI can list the methods in its help.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from cytoretrieve.registry import Registry

if TYPE_CHECKING:
    import numpy as np

    from cytoretrieve.queries.mil.bags import Bags

CONFIGS = ("train", "retrieval")  # the option groups a method may read: MILTrainConfig, RetrievalConfig


class Scorer(Protocol):
    def predict(self, vectors: Sequence[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(slide scores, tile scores per slide) of these bags."""


Fit = Callable[["Bags", "np.ndarray | None", Any], Scorer]  # (training bags, annotated positives, config)


@dataclass(frozen=True)
class MILMethod:
    name: str
    fit: Fit  # positives: annotated positive vectors (None: none given); config: see `config`
    help: str  # one phrase, shown by `score --help`
    config: str | None = None  # the config it is given: "train" (MILTrainConfig), "retrieval" (RetrievalConfig), None
    defaults: Mapping[str, Any] = field(default_factory=dict)  # fields of that config this method fixes
    positives: bool = False  # annotated positives are its own input (not only positive-bag augmentation's)

    @property
    def trains(self) -> bool:
        """Whether a model is trained: the training options apply, positive-bag augmentation included."""
        return self.config == "train"


METHODS: Registry[MILMethod] = Registry("MIL method")
DEFAULT_METHOD = "abmil"


def register_mil_method(name: str, fit: Fit, help: str, *, config: str | None = None,
                        defaults: Mapping[str, Any] | None = None, positives: bool = False) -> MILMethod:
    """Add (or replace) a method under `name`; returns its record."""
    if config is not None and config not in CONFIGS:
        raise ValueError(f"unknown config '{config}' (one of {', '.join(CONFIGS)}, or None)")
    return METHODS.add(name, MILMethod(name, fit, help, config, dict(defaults or {}), positives))


def get_method(name: str) -> MILMethod:
    """The record of `name`; a `CytoError` naming the known ones otherwise."""
    return METHODS.lookup(name)


def methods_help() -> str:
    """Every method with its help, for the CLI."""
    return METHODS.help(lambda m: m.help)


def method_config(method: MILMethod, train_config: Any = None, retrieval_config: Any = None) -> Any:  # noqa: ANN401
    """The config `method` is fitted with: the one given for its option group (else that group's defaults), with
    the method's own `defaults` set; None for a method that reads none."""
    if method.config is None:
        return None
    if method.config == "train":
        from cytoretrieve.queries.mil.train import MILTrainConfig

        given = train_config or MILTrainConfig()
    else:
        from cytoretrieve.queries.mil.retrieval import RetrievalConfig

        given = retrieval_config or RetrievalConfig()
    return replace(given, **method.defaults) if method.defaults else given


def _fit_trained(bags: Bags, positives: np.ndarray | None, config: Any) -> Scorer:  # noqa: ANN401
    from cytoretrieve.queries.mil.train import fit

    return fit(bags, config, positives if config.augment_positives > 0 else None)


def _fit_retrieval(bags: Bags, positives: np.ndarray | None, config: Any) -> Scorer:  # noqa: ANN401
    from cytoretrieve.queries.mil.retrieval import fit_retrieval

    return fit_retrieval(bags, positives, config)


# trained methods: one per pooling of `models.POOLINGS`, the record fixing the pooling (`MILTrainConfig.method`)
for _name, _help in (("abmil", "attention pooling (Ilse et al. 2018)"), ("gated", "gated attention pooling"),
                     ("mean", "mean pooling of the tile embeddings"), ("max", "max pooling of the tile embeddings"),
                     ("topk", "mean of the --top-k highest tile logits")):
    register_mil_method(_name, _fit_trained, _help, config="train", defaults={"method": _name})
register_mil_method("retrieval", _fit_retrieval, "training-free (FAISS): tiles vs positive and negative references",
                    config="retrieval", positives=True)
