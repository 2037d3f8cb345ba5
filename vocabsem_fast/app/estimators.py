"""What each ``TextClassifier`` method fits on a frozen model's features, how it turns them into
class probabilities, and what of it is saved.

Every method sees the same ``Features`` of a batch of prompts: their ``Representations`` and the
zero-shot log-probabilities of the classes (the head's next-token logits of the label words' first
tokens, renormalised over the classes). What a method keeps is split into a JSON-able
``summary`` (what cross-validation chose) and named tensors, which is all a saved classifier holds.

    zeroshot   the model's own answer to the prompt; nothing is trained
    vds        the paper's semantic clustering module (``semantic_clustering``)
    vds+       the zero-shot answer corrected by a module on two layers (``vds_plus``)
    probe      logistic regression on vds+'s features (``probe``)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .probe import LinearProbe, ProbeConfig
from .representations import Representations
from .semantic_clustering import FitConfig, SemanticClustering, VDSClassifier
from .vds_plus import Choice, LayeredClustering, PlusConfig, VDSPlusClassifier, layered_features


@dataclass
class Features:
    reps: Representations
    prior: Tensor  # (M, classes) zero-shot log-probabilities

    def __len__(self) -> int:
        return len(self.reps)


@dataclass
class Vocabulary:
    """What a method may know of the model's vocabulary while it trains: every semantic basis
    (V, d), the head's weight and bias (the "mm" logits), and the label words' tokens among them.
    Prediction needs the label words' rows only, which the methods keep."""

    bases: Tensor
    label_token_ids: Tensor  # (classes,) the token whose basis stands for each label word
    head_weight: Tensor | None = None
    head_bias: Tensor | None = None


def _fields(config_cls) -> list[str]:
    """A configuration's option names (the seed is the classifier's own argument)."""
    return [f.name for f in dataclasses.fields(config_cls) if f.name != "seed"]


def _config(method_cls, config_cls, options: dict, seed: int):
    """``config_cls(**options, seed=seed)`` (options the method renames under their field names),
    an unknown option named with the method's valid ones."""
    renamed = getattr(method_cls, "RENAMED", {})
    known = method_cls.option_names()
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for method {method_cls.name!r}; valid options: "
                         f"{', '.join(sorted(known)) or 'none'}")
    return config_cls(**{renamed.get(k, k): v for k, v in options.items()}, seed=seed)


def _tuple_option(options: dict, name: str) -> None:
    # a spec or a config file gives one value, or several joined by "/"; a list from JSON too
    if name in options and not isinstance(options[name], tuple):
        value = options[name]
        parts = value if isinstance(value, list) else str(value).split("/")
        options[name] = tuple(float(v) for v in parts)


class ZeroShot:
    """The LM's answer to the zero-shot prompt: the label words' next-token probabilities."""

    name = "zeroshot"
    precision = "auto"  # the extraction's default (see models.extraction_dtype)
    needs_bases = False  # reads the label words' semantic bases
    needs_vocabulary = False  # trains against the whole vocabulary

    @classmethod
    def option_names(cls) -> list[str]:
        return []

    def __init__(self, num_classes: int, options: dict, seed: int):
        if options:
            raise ValueError(f"unknown option {sorted(options)[0]!r} for method 'zeroshot'; it takes none")
        self.num_classes = num_classes
        self.label_bases: Tensor | None = None  # (classes, d), set by attach before fit or restore

    def attach(self, label_bases: Tensor) -> None:
        """The semantic bases of the label words (the methods that read them: vds, vds+)."""
        self.label_bases = label_bases.float()
        self.d = label_bases.shape[1]

    def fit(self, features: Features, labels: Tensor, vocabulary: Vocabulary | None, progress: bool) -> None:
        pass

    def probabilities(self, features: Features) -> Tensor:
        return features.prior.float().softmax(-1)

    def summary(self) -> dict:
        return {}

    def tensors(self) -> dict[str, Tensor]:
        return {}

    def restore(self, summary: dict, tensors: dict[str, Tensor]) -> None:
        pass

    @property
    def trainable_parameters(self) -> int:
        return 0


class VDS(ZeroShot):
    """The paper's method: a semantic clustering module pulled toward the label words' bases."""

    name = "vds"
    precision = "float32"  # the paper's method as published and evaluated
    needs_bases = True
    needs_vocabulary = True
    RENAMED = {"train": "train_logits", "predict": "predict_logits"}  # the evaluation's short spec names

    @classmethod
    def option_names(cls) -> list[str]:
        return [*cls.RENAMED, "nproc", *_fields(FitConfig)]

    def __init__(self, num_classes: int, options: dict, seed: int):
        super().__init__(num_classes, {}, seed)
        options = dict(options)
        self.nproc = options.pop("nproc", 1)  # > 1: data-parallel training over local processes
        if isinstance(self.nproc, bool) or not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError(f"nproc must be a positive int, got {self.nproc!r}")
        self.config = _config(VDS, FitConfig, options, seed)
        self.classifier: VDSClassifier | None = None

    def fit(self, features: Features, labels: Tensor, vocabulary: Vocabulary | None, progress: bool) -> None:
        from .data_parallel import fit_data_parallel

        self.classifier = VDSClassifier(vocabulary.bases, vocabulary.label_token_ids,
                                        head_weight=vocabulary.head_weight, head_bias=vocabulary.head_bias,
                                        config=self.config)
        fit_data_parallel(self.classifier, features.reps, labels, self.nproc,
                          progress="vds training" if progress else None)
        self._keep_label_rows()

    def _keep_label_rows(self) -> None:
        # prediction reads the label words' rows only: keep those, not the (V, d) bases and head
        c = self.classifier
        ids, c.label_token_ids = c.label_token_ids, torch.arange(len(c.label_token_ids))
        c.bases = c.bases[ids]
        if c.head_weight is not None:
            c.head_weight = c.head_weight[ids]
            c.head_bias = None if c.head_bias is None else c.head_bias[ids]

    def probabilities(self, features: Features) -> Tensor:
        return self.classifier.class_logits(features.reps).softmax(-1)

    def tensors(self) -> dict[str, Tensor]:
        c = self.classifier
        out = {f"module.{k}": v for k, v in c.module.state_dict().items()}
        if c.head_weight is not None:
            out["head.weight"] = c.head_weight
            if c.head_bias is not None:
                out["head.bias"] = c.head_bias
        return out

    def restore(self, summary: dict, tensors: dict[str, Tensor]) -> None:
        head = tensors.get("head.weight")
        self.classifier = VDSClassifier(self.label_bases, torch.arange(self.num_classes), head_weight=head,
                                        head_bias=tensors.get("head.bias"), config=self.config)
        _load_module(self.classifier.module, tensors, "module.")

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.classifier.module.parameters())


class VDSPlus(ZeroShot):
    """``vds+``: the zero-shot answer as a prior that a module reading two layers corrects."""

    name = "vds+"
    needs_bases = True
    needs_vocabulary = True  # the vocabulary training candidate (off with vocabulary=false)

    @classmethod
    def option_names(cls) -> list[str]:
        return _fields(PlusConfig)

    def __init__(self, num_classes: int, options: dict, seed: int):
        super().__init__(num_classes, {}, seed)
        options = dict(options)
        for name in ("scales", "priors"):
            _tuple_option(options, name)
        self.config = _config(VDSPlus, PlusConfig, options, seed)
        self.needs_vocabulary = self.config.vocabulary
        self.classifier: VDSPlusClassifier | None = None

    def fit(self, features: Features, labels: Tensor, vocabulary: Vocabulary | None, progress: bool) -> None:
        from tqdm.auto import tqdm

        bases = ids = None
        if self.config.vocabulary and vocabulary is not None:
            bases, ids = vocabulary.bases, vocabulary.label_token_ids
        self.classifier = VDSPlusClassifier(self.label_bases, self.config, bases=bases, label_token_ids=ids)
        with tqdm(total=self.classifier.candidates_trained, desc="vds+ cross-validation", unit="candidate",
                  leave=False, disable=not progress) as bar:
            self.classifier.fit(features.reps, features.prior, labels, progress=bar)
        self.classifier.drop_vocabulary()

    def probabilities(self, features: Features) -> Tensor:
        return self.classifier.probabilities(features.reps, features.prior)

    def summary(self) -> dict:
        return dataclasses.asdict(self.classifier.choice)

    def tensors(self) -> dict[str, Tensor]:
        modules = self.classifier.module or []
        return {f"module.{k}.{name}": v for k, m in enumerate(modules) for name, v in m.state_dict().items()}

    def restore(self, summary: dict, tensors: dict[str, Tensor]) -> None:
        self.classifier = VDSPlusClassifier(self.label_bases, self.config)
        self.classifier.choice = Choice(**summary)
        count = len({name.split(".")[1] for name in tensors if name.startswith("module.")})
        if not self.classifier.choice.epochs:
            self.classifier.module = None
            return
        modules = []
        for k in range(count):
            module = (LayeredClustering(self.d, 3) if self.config.read == "layers"
                      else SemanticClustering(self.d, attention=self.config.attention))
            _load_module(module, tensors, f"module.{k}.")
            modules.append(module)
        self.classifier.module = nn.ModuleList(modules)

    @property
    def trainable_parameters(self) -> int:
        modules = self.classifier.module or []
        return sum(p.numel() for m in modules for p in m.parameters())


class Probe(ZeroShot):
    """Logistic regression on vds+'s features (the last layer's last token, the inner layer's
    last token and mean), its regularisation chosen by cross-validation."""

    name = "probe"

    needs_bases = False

    @classmethod
    def option_names(cls) -> list[str]:
        return _fields(ProbeConfig)

    def __init__(self, num_classes: int, options: dict, seed: int):
        super().__init__(num_classes, {}, seed)
        self.probe = LinearProbe(num_classes, _config(Probe, ProbeConfig, options, seed))

    def fit(self, features: Features, labels: Tensor, vocabulary: Vocabulary | None, progress: bool) -> None:
        self.probe.fit(layered_features(features.reps), labels)

    def probabilities(self, features: Features) -> Tensor:
        return self.probe.probabilities(layered_features(features.reps))

    def summary(self) -> dict:
        return {"C": self.probe.chosen_c, "validation_score": self.probe.validation_score,
                "scoring": self.probe.config.scoring}

    def tensors(self) -> dict[str, Tensor]:
        return {f"probe.{k}": v for k, v in self.probe.tensors().items()}

    def restore(self, summary: dict, tensors: dict[str, Tensor]) -> None:
        self.probe.load_tensors({k.removeprefix("probe."): v for k, v in tensors.items() if k.startswith("probe.")})
        self.probe.chosen_c, self.probe.validation_score = summary.get("C"), summary.get("validation_score")

    @property
    def trainable_parameters(self) -> int:
        return self.probe.trainable_parameters


def _load_module(module: nn.Module, tensors: dict[str, Tensor], prefix: str) -> None:
    state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    module.load_state_dict(state, strict=True)
    module.eval()


METHODS = {cls.name: cls for cls in (VDSPlus, VDS, Probe, ZeroShot)}


def option_names(method: str) -> list[str]:
    """The options a method takes (its configuration's fields, and a few of its own)."""
    return METHODS[method].option_names()
