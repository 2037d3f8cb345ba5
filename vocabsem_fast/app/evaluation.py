"""The evaluation harness: every method on the same task (model, seeded subsets), accuracy,
macro-F1 and wall time split into fit and predict, plus a look at the representations before and
after the semantic clustering module (adjusted Rand index, kNN accuracy, a 2-D picture).

Methods are named by a spec, ``name[:key=value...]``: ``vds``, ``vds:train=mm:predict=mm``,
``vds:train=sm-gt``, ``vds:attention=last``, ``icl:shots=8``, ``rag``, ``knn:k=3``,
``lora:epochs=3``, ``ia3``, ``probe`` (logistic regression on vds+'s features), and two
untrained references, ``zeroshot`` (the LM head on the zero-shot prompt) and ``cosine``
(nearest label basis of the raw representation).
"""

from __future__ import annotations

import inspect
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kmeans import kmeans
from ..ops import similarity_logits
from .baselines import AdapterTuning, InContextLearning, KNNPrompting, RetrievalICL, majority_vote
from .classifier import TextClassifier
from .estimators import option_names
from .memory import PeakMemory
from .models import extraction_dtype
from .tasks import Task, head_logits

DEFAULT_METHODS = ("vds", "knn", "icl", "rag", "lora", "ia3")


class KeptClassifier:
    """A ``TextClassifier`` method evaluated on a task: the adapter only feeds the classifier the
    task's splits, so the figures are those of the object a user keeps. Its forward passes are the
    task's shared representations (the same prompts through the same extraction), charged to
    every method that reads them."""

    uses_representations = ("train", "test")
    method = ""

    def __init__(self, **options):
        self.options = options
        # the options are checked now, before any model work (the model loads lazily)
        checked = TextClassifier("{text}", {"a": "a", "b": "b"}, method=self.method, **options)
        self.config = getattr(checked._estimator, "config", None)
        self.precision = checked.precision
        self.extraction_dtype: torch.dtype | None = None  # decided by fit, from the model's device
        self.text_classifier: TextClassifier | None = None

    def fit(self, task: Task) -> KeptClassifier:
        clf = TextClassifier(task.data.template, task.data.label_words, model=task.model, tokenizer=task.tokenizer,
                             text_fields=list(task.data.text_fields), method=self.method, seed=task.seed,
                             batch_size=task.batch_size, progress=task.progress, **self.options)
        self.extraction_dtype = extraction_dtype(clf.precision, task.model)
        clf._represent = partial(task.represent, dtype=self.extraction_dtype)
        clf._chunk = None  # a split in one piece: its shared representations serve
        self.text_classifier = clf.fit([e.fields for e in task.train], [e.label for e in task.train])
        return self

    def predict(self, task: Task) -> Tensor:
        return self.text_classifier.predict_proba([e.fields for e in task.test]).argmax(-1)

    @property
    def classifier(self):
        """The fitted method's own classifier (``VDSClassifier``, ``VDSPlusClassifier``, ...)."""
        estimator = self.text_classifier._estimator
        return getattr(estimator, "classifier", None) or getattr(estimator, "probe", None)

    def details(self) -> dict:
        return {"extraction_dtype": str(self.extraction_dtype).removeprefix("torch.")}


class VDS(KeptClassifier):
    """The paper's semantic clustering module trained on frozen representations."""

    method = "vds"


class VDSPlus(KeptClassifier):
    """``vds+`` (see ``vds_plus``): the zero-shot answer as a prior that a module reading the last
    and an inner layer corrects, every choice made by cross-validation on the training data."""

    method = "vds+"

    def details(self) -> dict:
        choice = self.classifier.choice
        return {**super().details(),
                "choice": {"training": choice.training, "prior_weight": choice.prior_weight, "scale": choice.scale,
                           "epochs": choice.epochs, "validation_accuracy": choice.validation_accuracy},
                "validation_candidates": choice.candidates}


class Probe(KeptClassifier):
    """A logistic-regression probe on vds+'s frozen features, C chosen by cross-validation."""

    method = "probe"

    def details(self) -> dict:
        return {**super().details(), "choice": self.text_classifier.fit_summary_}


class ZeroShotHead:
    """The LM's own answer to the zero-shot prompt: the label word with the highest next-token logit."""

    uses_representations = ("test",)

    def fit(self, task: Task) -> ZeroShotHead:
        return self

    def predict(self, task: Task) -> Tensor:
        return head_logits(task.model, task.representations("test").last, task.next_token_ids).argmax(-1)


class ZeroShotCosine(ZeroShotHead):
    """Nearest label basis of the untrained representation (what VDS starts from)."""

    def predict(self, task: Task) -> Tensor:
        bases = task.basis.for_words(task.words)
        return similarity_logits(task.representations("test").last, bases).argmax(-1)


FACTORIES = {
    "vds": VDS,
    "vds+": VDSPlus,
    "probe": Probe,
    "icl": InContextLearning,
    "rag": RetrievalICL,
    "knn": KNNPrompting,
    "lora": lambda **kw: AdapterTuning("lora", **kw),
    "ia3": lambda **kw: AdapterTuning("ia3", **kw),
    "zeroshot": ZeroShotHead,
    "cosine": ZeroShotCosine,
}


def _value(text: str):
    # "true" / "false" as booleans: any other text would be a string, and a non-empty one truthy
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """``(name, options)`` of a spec ``name[:key=value...]``; values read as booleans, numbers or text."""
    name, *pairs = spec.strip().split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"method option {pair!r} in {spec!r} is not key=value")
        options[key.replace("-", "_")] = _value(value)
    return name, options


def make_method(spec: str):
    """A method from its spec, ``name[:key=value...]`` (see the module docstring)."""
    name, options = parse_spec(spec)
    if name not in FACTORIES:
        raise ValueError(f"unknown method {name!r} in {spec!r}; known: {', '.join(FACTORIES)}")
    known = method_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r} for method {name!r} in {spec!r}; "
                         f"valid options: {', '.join(known) or 'none'}")
    try:
        return FACTORIES[name](**options)
    except TypeError as exc:
        raise ValueError(f"bad option for method {name!r} in {spec!r}: {exc}") from None


def method_options(name: str) -> list[str]:
    """The option names a method's spec accepts (its constructor's keywords; for the methods of
    ``TextClassifier``, its method's options and ``precision``)."""
    factory = {"lora": AdapterTuning, "ia3": AdapterTuning}.get(name, FACTORIES[name])
    if isinstance(factory, type) and issubclass(factory, KeptClassifier):
        return [*option_names(factory.method), "precision"]
    params = inspect.signature(factory).parameters.values()
    return [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "kind"]


def parse_methods(text: str) -> list[str]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ValueError("methods is empty")
    for spec in specs:
        make_method(spec)  # fail before any model work
    return specs


def scores(truth: Tensor, predicted: Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over all the task's classes; a class never predicted and
    never true counts as F1 0, as sklearn does with zero_division=0)."""
    from sklearn.metrics import f1_score

    truth, predicted = truth.tolist(), predicted.tolist()
    accuracy = sum(t == p for t, p in zip(truth, predicted)) / max(1, len(truth))
    macro_f1 = f1_score(truth, predicted, labels=list(range(num_classes)), average="macro", zero_division=0)
    return {"accuracy": float(accuracy), "macro_f1": float(macro_f1)}


def knn_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, k: int = 5) -> float:
    """Accuracy of a k-nearest-neighbour vote (cosine) of test points among the train points."""
    nearest = (F.normalize(test, dim=-1) @ F.normalize(train, dim=-1).T).topk(min(k, len(train)), dim=-1).indices
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    return float((majority_vote(train_labels[nearest], classes) == test_labels).float().mean())


def cluster_quality(points: Tensor, labels: Tensor, num_classes: int, seed: int) -> float:
    """Adjusted Rand index of spherical k-means (k = classes) against the labels."""
    from sklearn.metrics import adjusted_rand_score

    _, assigned = kmeans(points.float(), num_classes, iters=50, metric="cosine", seed=seed)
    return float(adjusted_rand_score(labels.tolist(), assigned.tolist()))


def representation_analysis(task: Task, method: VDS) -> dict[str, float]:
    """ARI and kNN accuracy of the test representations before and after the module."""
    train, test = task.representations("train"), task.representations("test")
    train_labels, test_labels = task.labels("train"), task.labels("test")
    after_train, after_test = method.classifier.transform(train), method.classifier.transform(test)
    return {
        "ari_before": cluster_quality(test.last, test_labels, task.num_classes, task.seed),
        "ari_after": cluster_quality(after_test, test_labels, task.num_classes, task.seed),
        "knn_accuracy_before": knn_accuracy(train.last, train_labels, test.last, test_labels),
        "knn_accuracy_after": knn_accuracy(after_train, train_labels, after_test, test_labels),
    }


def plot_representations(task: Task, method: VDS, path: Path, title: str) -> Path:
    """Side-by-side 2-D PCA of the test representations before and after the module, coloured
    by label; the label words' bases are drawn as stars in the "after" panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = task.representations("test")
    labels = task.labels("test").numpy()
    after = method.classifier.transform(test)
    label_bases = F.normalize(task.basis.for_words(task.words).float(), dim=-1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    panels = [("before: last-token representation", F.normalize(test.last, dim=-1), None),
              ("after: semantic clustering module", F.normalize(after, dim=-1), label_bases)]
    colours = plt.get_cmap("tab10")
    for ax, (name, points, stars) in zip(axes, panels):
        mean = points.mean(0, keepdim=True)
        _, _, v = torch.pca_lowrank(points - mean, q=2, center=False, niter=4)
        xy = ((points - mean) @ v).numpy()
        for c, word in enumerate(task.words):
            chosen = labels == c
            ax.scatter(xy[chosen, 0], xy[chosen, 1], s=8, alpha=0.6, color=colours(c % 10), label=word)
        if stars is not None:
            sxy = ((stars - mean) @ v).numpy()
            for c in range(len(task.words)):
                ax.scatter(sxy[c, 0], sxy[c, 1], marker="*", s=250, color=colours(c % 10), edgecolor="black")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0].legend(loc="best", fontsize=8, markerscale=2)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def representation_keys(task: Task, method) -> list[str]:
    """The keys (``Task.representation_key``) of the shared representations ``method`` reads."""
    dtype = getattr(method, "extraction_dtype", None)
    return [task.representation_key(split, dtype) for split in method.uses_representations]


def evaluate_task(task: Task, methods: list[str], *, plot_dir: str | Path | None = None,
                  on_result=None, on_fitted=None) -> dict[str, dict]:
    """Fit and score each method on ``task``; ``{spec: result}``. A method is charged the time of
    the shared representations it uses even when another method computed them first."""
    results = {}
    for spec in methods:
        method = make_method(spec)
        ready = set(task.extraction_seconds)
        with PeakMemory() as peak:
            start = time.perf_counter()
            method.fit(task)
            fit_seconds = time.perf_counter() - start
            start = time.perf_counter()
            predicted = method.predict(task)
            predict_seconds = time.perf_counter() - start
        keys = representation_keys(task, method)
        for key in keys:
            if key in ready:
                shared = task.extraction_seconds[key]
                if key.partition("@")[0] == "train":
                    fit_seconds += shared
                else:
                    predict_seconds += shared
        result = scores(task.labels("test"), predicted, task.num_classes)
        result.update(seconds=fit_seconds + predict_seconds, fit_seconds=fit_seconds, predict_seconds=predict_seconds,
                      # of which the forward passes that extracted the shared representations
                      extraction_seconds={key: task.extraction_seconds[key] for key in keys},
                      trainable_parameters=trainable_parameters(method), peak_memory_mib=peak.above_start_mib,
                      train_size=len(task.train), test_size=len(task.test), test_is_train_holdout=task.holdout)
        if hasattr(method, "details"):
            result.update(method.details())
        if isinstance(method, VDS):
            result["analysis"] = representation_analysis(task, method)
            if plot_dir is not None:
                name = spec.replace(":", "_").replace("=", "-")
                path = Path(plot_dir) / f"{task.data.name}-{name}.png"
                result["plot"] = str(plot_representations(task, method, path, f"{task.data.name}: {spec}"))
        results[spec] = result
        if on_result is not None:
            on_result(spec, result)
        if on_fitted is not None:
            on_fitted(spec, method)
        del method  # an adapter's model copy goes now, not after the next method
    return results


def method_costs(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    """Per method, over the data sets that ran it: mean accuracy and macro-F1, mean fit and
    predict seconds, trainable parameters (the largest) and peak memory (the largest, MiB)."""
    rows: dict[str, list[dict]] = {}
    for per_set in results.values():
        for spec, result in per_set.items():
            rows.setdefault(spec, []).append(result)
    costs = {}
    for spec, rs in rows.items():
        def mean(key, rs=rs):
            return sum(r[key] for r in rs) / len(rs)
        memory = [r["peak_memory_mib"] for r in rs if r.get("peak_memory_mib") is not None]
        costs[spec] = {"accuracy": mean("accuracy"), "macro_f1": mean("macro_f1"),
                       "fit_seconds": mean("fit_seconds"), "predict_seconds": mean("predict_seconds"),
                       "trainable_parameters": max(r.get("trainable_parameters", 0) for r in rs),
                       "peak_memory_mib": max(memory) if memory else None, "sets": len(rs)}
    return costs


def _by_fit_time(costs: dict[str, dict]) -> list[tuple[float, float, str]]:
    """(fit seconds, accuracy, method), cheapest first and, at equal time, the more accurate first."""
    return sorted(((max(c["fit_seconds"], 1e-2), c["accuracy"], spec) for spec, c in costs.items()),
                  key=lambda p: (p[0], -p[1]))


def frontier_methods(costs: dict[str, dict]) -> list[str]:
    """The methods more accurate than every method that fits in no more time, cheapest first."""
    chosen, best = [], float("-inf")
    for _, accuracy, spec in _by_fit_time(costs):
        if accuracy > best:
            chosen.append(spec)
            best = accuracy
    return chosen


def plot_frontier(results: dict[str, dict[str, dict]], path: str | Path, title: str = "") -> Path:
    """Mean accuracy against mean fit time (log scale) of every method, the methods that no
    other beats on both drawn as the frontier a user chooses from."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = method_costs(results)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    points = _by_fit_time(costs)
    on_frontier = set(frontier_methods(costs))
    frontier = [(x, y) for x, y, spec in points if spec in on_frontier]
    for i, (x, y, spec) in enumerate(points):
        on = spec in on_frontier
        ax.scatter([x], [y], s=60 if on else 30, color="tab:blue" if on else "tab:gray", zorder=3)
        ax.annotate(spec, (x, y), textcoords="offset points", xytext=(5, 4 if i % 2 == 0 else -10), fontsize=8)
    ax.step([p[0] for p in frontier], [p[1] for p in frontier], where="post", color="tab:blue", alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("mean fit seconds per data set (log; shared representations charged)")
    ax.set_ylabel(f"mean accuracy over {max(c['sets'] for c in costs.values())} data sets")
    ax.set_title(title or "accuracy against fit time")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trainable_parameters(method) -> int:
    """Parameters the method trains (0 for the prompting methods and the untrained references)."""
    if isinstance(method, KeptClassifier):
        return method.text_classifier.trainable_parameters_
    module = getattr(getattr(method, "classifier", None), "module", None)
    if module is None:
        module = getattr(method, "model", None) if isinstance(method, AdapterTuning) else None
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """One row per data set and method: accuracy, macro-F1, fit / predict seconds."""
    header = f"{'data':<10} {'method':<26} {'acc':>6} {'macro-F1':>8} {'fit s':>8} {'predict s':>9}"
    lines = [header, "-" * len(header)]
    for data_name, per_method in results.items():
        for spec, r in per_method.items():
            lines.append(f"{data_name:<10} {spec:<26} {r['accuracy']:>6.3f} {r['macro_f1']:>8.3f} "
                         f"{r['fit_seconds']:>8.1f} {r['predict_seconds']:>9.1f}")
    return "\n".join(lines)


def format_costs(results: dict[str, dict[str, dict]]) -> str:
    """One row per method, means over the data sets: accuracy, fit and predict seconds,
    trainable parameters and peak memory (what the method added to the process, MiB)."""
    header = f"{'method':<26} {'mean acc':>8} {'fit s':>8} {'predict s':>9} {'trainable':>10} {'peak MiB':>9}"
    lines = [header, "-" * len(header)]
    for spec, c in method_costs(results).items():
        memory = "n/a" if c["peak_memory_mib"] is None else f"{c['peak_memory_mib']:.0f}"
        lines.append(f"{spec:<26} {c['accuracy']:>8.3f} {c['fit_seconds']:>8.1f} {c['predict_seconds']:>9.1f} "
                     f"{c['trainable_parameters']:>10,} {memory:>9}")
    return "\n".join(lines)


def format_analysis(results: dict[str, dict[str, dict]]) -> str:
    lines = []
    for data_name, per_method in results.items():
        for spec, r in per_method.items():
            a = r.get("analysis")
            if a:
                lines.append(f"{data_name} {spec}: ARI {a['ari_before']:.3f} -> {a['ari_after']:.3f}, "
                             f"kNN accuracy {a['knn_accuracy_before']:.3f} -> {a['knn_accuracy_after']:.3f}"
                             + (f"  ({r['plot']})" if "plot" in r else ""))
    return "\n".join(lines)
