"""The vds+ comparison: per data set, vds+ / vds / zero-shot / kNN prompting over the seeds run
by ``bench/app/run_vds_plus.sh``, beside ICL, retrieval ICL, LoRA and IA3 of seed 0 from
``all-methods.json`` and of the seeds run by ``bench/app/run_baselines.sh`` (mean and spread
over the seeds present); the targets checked; the cost table; and the frontier picture.

    python bench/app/summarize_vds_plus.py > bench/results/eval/vds-plus.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vocabsem_fast.app.evaluation import format_costs, plot_frontier  # noqa: E402

EVAL = ROOT / "bench" / "results" / "eval"
SEEDED = ["vds+", "vds", "zeroshot", "knn", "cosine"]
SLOW = ["icl", "rag", "lora", "ia3"]
CHEAP_RIVALS = ["zeroshot", "icl", "rag", "knn"]
# costs (seconds, memory) come from this seed's runs where they exist: on this machine, each run
# alone on it, every method extracting its own representations; else from all-methods.json
COST_SEED = 2


def _adapter_parameters(kind: str) -> int:
    """Trainable parameters of the lora / ia3 baseline on the default model (all-methods.json
    predates their recording): the same peft configuration, counted."""
    from vocabsem_fast.app.baselines import AdapterTuning
    from vocabsem_fast.app.models import load_model

    model, _ = load_model("default", verbose=False)
    method = AdapterTuning(kind)
    method.seed = 0
    return sum(p.numel() for p in method._adapted(model).parameters() if p.requires_grad)


def _slow_runs(baseline: dict) -> dict[str, dict[int, dict[str, dict]]]:
    """Each slow method's results per seed and set: seed 0 from all-methods.json, other seeds
    from baselines/seed<S>-<method>.json (a set missing from an unfinished run is left out)."""
    runs: dict[str, dict[int, dict[str, dict]]] = {m: {0: {}} for m in SLOW}
    for s, methods in baseline.items():
        for m in SLOW:
            if m in methods:
                runs[m][0][s] = methods[m]
    for path in sorted((EVAL / "baselines").glob("seed*-*.json")):
        seed, method = path.stem.removeprefix("seed").split("-", 1)
        for s, methods in json.loads(path.read_text()).items():
            runs[method].setdefault(int(seed), {})[s] = methods[method]
    return runs


def _seeded_runs() -> dict[int, dict[str, dict]]:
    """Per seed and set, the methods of run_vds_plus.sh: the full run vds-plus-seed<S>.json, with
    the methods rerun after a change (vds-plus-seed<S>-<methods>.json) laid over it."""
    runs: dict[int, dict[str, dict]] = {}
    def rerun(path: Path) -> bool:
        return "-" in path.stem.removeprefix("vds-plus-seed")

    for path in sorted(EVAL.glob("vds-plus-seed*.json"), key=lambda p: (rerun(p), p.name)):
        seed = int(path.stem.removeprefix("vds-plus-seed").split("-")[0])
        for s, methods in json.loads(path.read_text()).items():
            runs.setdefault(seed, {}).setdefault(s, {}).update(methods)
    return runs


def _on_set(by_seed: dict[int, dict[str, dict]], s: str) -> list[dict]:
    """The results on set ``s`` of every seed that ran it."""
    return [by_set[s] for by_set in by_seed.values() if s in by_set]


def _training_extraction(result: dict) -> float | None:
    """Seconds of the forward passes that extracted the training representations, at whatever
    precision (key ``train`` or ``train@dtype``)."""
    times = [t for key, t in result.get("extraction_seconds", {}).items() if key.partition("@")[0] == "train"]
    return times[0] if times else None


def _variants(runs: dict[int, dict[str, dict]], sets: list[str]) -> list[str]:
    """The vds+ variants (``vds+:option=value``) that every seed ran on every set."""
    found = {m for by_set in runs.values() for methods in by_set.values() for m in methods if m.startswith("vds+:")}
    return sorted(m for m in found if all(m in runs[k].get(s, {}) for k in runs for s in sets))


def main() -> None:
    runs = _seeded_runs()
    baseline = json.loads((EVAL / "all-methods.json").read_text())
    slow = _slow_runs(baseline)
    sets = list(baseline)
    seeds = sorted(runs)
    seeded = SEEDED[:1] + _variants(runs, sets) + SEEDED[1:]
    out = ["# vds+ against the paper's vds and every baseline", "",
           "Machine: 2-core AMD EPYC, no GPU; torch 2.13.0+cpu, transformers 5.24 (5.25 for the vds+ reruns), "
           "peft 0.21.2. Default model (SmolLM2-135M-Instruct), 256 training / 250 test examples per set as in "
           "all-methods.json. Commands:", "",
           "    bash bench/app/run_vds_plus.sh 0 1 2", "    METHODS=vds+ bash bench/app/run_vds_plus.sh 0 1 2",
           "    METHODS=vds+:vocabulary=false bash bench/app/run_vds_plus.sh 0 1 2",
           '    bash bench/app/run_baselines.sh "1 2" "ia3 icl rag lora"',
           "    python bench/app/summarize_vds_plus.py > bench/results/eval/vds-plus.md", "",
           f"Seeds: {seeds} for {', '.join(seeded)}; for {', '.join(SLOW)} seed 0 from all-methods.json (an "
           "earlier run on a 2-core Xeon) and " + "; ".join(
               f"{m} " + (", ".join(f"seed {k} ({len(v)} set{'s' if len(v) > 1 else ''})"
                                     for k, v in sorted(slow[m].items()) if k)
                          or "no other seed") for m in SLOW)
           + ". Accuracy, mean over the seeds of each set (min-max where more than one).", ""]
    out.append("| method | " + " | ".join(sets) + " | mean |")
    out.append("|---" * (len(sets) + 2) + "|")
    means: dict[str, dict[str, float]] = {}
    for method in seeded + SLOW:
        cells, per_set = [], {}
        for s in sets:
            if method in seeded:
                values = [runs[k][s][method]["accuracy"] for k in seeds if s in runs[k] and method in runs[k][s]]
            else:
                values = [r["accuracy"] for r in _on_set(slow[method], s)]
            if not values:
                cells.append("-")
                continue
            per_set[s] = statistics.mean(values)
            spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
            cells.append(f"{per_set[s]:.3f}{spread}")
        means[method] = per_set
        mean = statistics.mean(per_set.values()) if len(per_set) == len(sets) else float("nan")
        out.append(f"| {method} | " + " | ".join(cells) + f" | {mean:.3f} |")
    out += ["", "Targets (each method as its mean over the seeds it has on the set):", ""]
    for s in sets:
        rivals = {m: means[m][s] for m in CHEAP_RIVALS if s in means[m]}
        best = max(rivals, key=rivals.get)
        gap = means["vds+"][s] - rivals[best]
        verdict = "met" if gap >= 0 else f"missed by {-gap:.3f}"
        out.append(f"- {s}: vds+ {means['vds+'][s]:.3f} against the best of zero-shot / ICL / RAG / kNN "
                   f"({best} {rivals[best]:.3f}): {verdict}")
    ia3_mean = statistics.mean(means["ia3"].values())
    # one row per method: accuracy and macro-F1 as in the table above (means over the seeds),
    # costs from COST_SEED where it ran the method on the set, else from all-methods.json
    cost_seed = COST_SEED if COST_SEED in runs else seeds[-1]
    merged: dict[str, dict[str, dict]] = {s: {} for s in sets}
    sources = {}
    for m in SLOW:
        cost_run = slow[m].get(COST_SEED, {})
        complete = all(s in cost_run for s in sets)
        sources[m] = f"seed {COST_SEED}" if complete else "all-methods.json"
        for s in sets:
            merged[s][m] = {**(cost_run[s] if complete else baseline[s][m]), "accuracy": means[m][s],
                            "macro_f1": statistics.mean(r["macro_f1"] for r in _on_set(slow[m], s))}
    for m in seeded:
        sources[m] = f"seed {cost_seed}"
        for s in sets:
            merged[s][m] = {**runs[cost_seed][s][m], "accuracy": means[m][s],
                            "macro_f1": statistics.mean(runs[k][s][m]["macro_f1"] for k in seeds)}
    ia3_fit = statistics.mean(merged[s]["ia3"]["fit_seconds"] for s in sets)
    for plus in seeded[:seeded.index("vds")]:  # vds+ and its variants
        plus_mean = statistics.mean(means[plus].values())
        plus_fit = statistics.mean(merged[s][plus]["fit_seconds"] for s in sets)
        out.append(f"- {plus}: mean accuracy {plus_mean:.3f}, IA3 {ia3_mean:.3f} (within 0.02: "
                   f"{'met' if plus_mean >= ia3_mean - 0.02 else f'missed by {ia3_mean - 0.02 - plus_mean:.3f}'})")
        out.append(f"  - mean fit seconds ({sources[plus]} for {plus}, {sources['ia3']} for IA3; both extracting their "
                   f"own representations): {plus} {plus_fit:.1f}, IA3 {ia3_fit:.1f} "
                   f"(at most a fifth: {'met' if plus_fit <= ia3_fit / 5 else 'missed'}, "
                   f"{plus_fit / ia3_fit:.2f} of it)")
        extraction = [_training_extraction(merged[s][plus]) for s in sets]
        if None not in extraction:
            floor = statistics.mean(extraction)
            dtypes = {merged[s][plus].get("extraction_dtype", "float32") for s in sets}
            out.append(f"  - of it, the forward passes ({', '.join(sorted(dtypes))}) that extract the training "
                       f"representations: {floor:.1f} s ({floor / ia3_fit:.2f} of IA3's fit), the validated "
                       f"training: {plus_fit - floor:.1f} s")
    out += ["", "What vds+ chose on validation (per seed):", ""]
    for s in sets:
        for k in seeds:
            c = runs[k][s]["vds+"]["choice"]
            out.append(f"- {s} seed {k}: {c['training']} training, prior {c['prior_weight']:g}, scale "
                       f"{c['scale']:g}, {c['epochs']} epochs (validation accuracy {c['validation_accuracy']:.3f})")
    for kind in ("lora", "ia3"):
        count = _adapter_parameters(kind)
        for s in sets:
            merged[s][kind].setdefault("trainable_parameters", count)
    origin = "; ".join(f"{m} from {where}" for m, where in sources.items())
    out += ["", f"Cost (mean over the sets; accuracy and macro-F1 the means above; seconds, parameters and memory: "
            f"{origin}; fit includes extracting the representations a method uses; peak memory is what the "
            "method added to the process (the first method of a set, vds+, also holds the forward passes that "
            "extract the representations), not recorded in all-methods.json):", "",
            "```", format_costs(merged), "```"]
    picture = plot_frontier(merged, EVAL / "frontier.png", "seven shared sets, default model")
    out += ["", f"![accuracy against fit time]({picture.name})"]
    print("\n".join(out))


if __name__ == "__main__":
    main()
