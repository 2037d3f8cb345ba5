"""The baselines on tiny random models: each prediction equals what a plain, unbatched forward
pass of the same prompt gives; retrieval picks the nearest examples; kNN prompting's distance is
the KL divergence of the two next-token distributions; adapters train without touching the LM."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from vocabsem_fast.app.baselines import AdapterTuning, InContextLearning, KNNPrompting, RetrievalICL, build_context
from vocabsem_fast.app.data import ClassificationData, Example
from vocabsem_fast.app.tasks import Task, first_token_ids

from tiny_models import tiny_gpt2, tiny_llama, word_tokenizer_fast

FILLER = "the a movie plot was very quite and it film story".split()
WORDS = FILLER + "good bad yes no Text Label : .".split()


def tiny_data(n_train: int, n_test: int, seed: int) -> ClassificationData:
    """Two classes told apart by one word among random filler words."""
    rng = random.Random(seed)

    def example(i: int) -> Example:
        label = ("pos", "neg")[i % 2]  # both classes in every split
        words = rng.choices(FILLER, k=rng.randint(1, 6))
        words.insert(rng.randint(0, len(words)), "good" if label == "pos" else "bad")
        return Example({"sentence": " ".join(words)}, label)

    return ClassificationData("tiny", "Text : {sentence} Label :", ("sentence",), {"pos": "yes", "neg": "no"},
                              [example(i) for i in range(n_train)], [example(i) for i in range(n_test)])


def tiny_task(make=tiny_llama, n_train: int = 23, n_test: int = 11, **kw) -> Task:
    seed = int(torch.randint(1000, ()))  # from the test's seed, so a failure reproduces
    return Task(make(vocab=len(WORDS) + 2), word_tokenizer_fast(WORDS), tiny_data(n_train, n_test, seed), seed=seed,
                batch_size=5, use_cache=False, progress=False, **kw)


@torch.no_grad()
def next_token_logits(model, tokenizer, prompt: str) -> torch.Tensor:
    """Last-position logits of one prompt, no padding, no batching."""
    return model(**tokenizer(prompt, return_tensors="pt")).logits[0, -1]


def label_choice(task: Task, prompt: str) -> int:
    return int(next_token_logits(task.model, task.tokenizer, prompt)[task.next_token_ids].argmax())


def test_first_token_ids_and_shared_first_tokens():
    tokenizer = word_tokenizer_fast(WORDS)
    expected = [tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no")]
    assert first_token_ids(tokenizer, ["yes", "no"]).tolist() == expected
    with pytest.raises(ValueError, match="share a first token"):
        first_token_ids(tokenizer, ["yes", "yes good"])


def test_build_context_drops_the_farthest_demonstrations_first():
    tokenizer = word_tokenizer_fast(WORDS)
    demos = ["good movie yes", "bad plot no", "very good film yes"]
    query = "the story was bad Label :"
    full = build_context(tokenizer, demos, query, 1000)
    assert full == "\n\n".join(demos + [query])
    n_query, n_last = len(tokenizer(query)["input_ids"]), len(tokenizer(demos[-1])["input_ids"])
    assert build_context(tokenizer, demos, query, n_query + n_last) == demos[-1] + "\n\n" + query
    assert build_context(tokenizer, demos, query, n_query) == query
    cut = build_context(tokenizer, demos, query, 3)  # the query alone is too long: keep its end
    assert tokenizer(cut)["input_ids"] == tokenizer(query)["input_ids"][-3:]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("shots", [0, 3])
def test_icl_predicts_what_an_unbatched_forward_pass_predicts(make, shots):
    task = tiny_task(make)
    method = InContextLearning(shots).fit(task)
    assert len(method.demonstrations) == shots
    assert all(d in task.train for d in method.demonstrations)
    predicted = method.predict(task)
    demos = "".join(task.demonstration(d) + "\n\n" for d in method.demonstrations)
    expected = [label_choice(task, demos + task.data.prompt(q)) for q in task.test]
    assert predicted.tolist() == expected


def test_rag_uses_the_nearest_training_examples_most_similar_last():
    task = tiny_task()
    method = RetrievalICL(2).fit(task)
    chosen = method._demonstrations_for(task)
    train = F.normalize(task.representations("train").last, dim=-1)
    test = F.normalize(task.representations("test").last, dim=-1)
    for q, demos in enumerate(chosen):
        sims = test[q] @ train.T
        order = sims.argsort(descending=True)[:2].flip(0).tolist()
        got = [task.train.index(d) for d in demos]
        assert sims[got].tolist() == pytest.approx(sims[order].tolist(), abs=1e-6)  # ties may swap equal examples
    predicted = method.predict(task)
    expected = [label_choice(task, "".join(task.demonstration(d) + "\n\n" for d in demos) + task.data.prompt(q))
                for demos, q in zip(chosen, task.test)]
    assert predicted.tolist() == expected


@pytest.mark.parametrize("shots", [0, 2])
def test_knn_prompting_is_a_vote_over_kl_nearest_anchors(shots):
    task = tiny_task(n_train=17, n_test=7)
    with torch.no_grad():  # a random tiny LM's next-token distributions are nearly uniform: sharpen them
        task.model.get_output_embeddings().weight.mul_(30.0)
    method = KNNPrompting(k=3, shots=shots, chunk=4).fit(task)  # chunks of 4 rows: several blocks
    demos = "".join(task.demonstration(d) + "\n\n" for d in method.demonstrations)
    chosen = {id(d) for d in method.demonstrations}
    anchors = [e for e in task.train if id(e) not in chosen]
    assert method.anchor_labels.tolist() == [task.data.label_index(e) for e in anchors]

    def log_probs(example):
        return F.log_softmax(next_token_logits(task.model, task.tokenizer, demos + task.data.prompt(example)), -1)

    anchor_lp = torch.stack([log_probs(e) for e in anchors])
    query_lp = torch.stack([log_probs(e) for e in task.test])
    expected = torch.stack([(anchor_lp.exp() * (anchor_lp - q)).sum(-1) for q in query_lp])  # KL(anchor || query)
    got = method.distances(task, method._states(task, task.test, "test"))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    predicted = method.predict(task)
    for row, pred in zip(got, predicted.tolist()):  # the vote, on the distances checked above
        nearest = row.argsort()[:3]
        votes = torch.bincount(method.anchor_labels[nearest], minlength=2)
        if votes.max() > votes.min():
            assert pred == int(votes.argmax())
        else:
            assert pred == int(method.anchor_labels[nearest[0]])


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_adapter_training_learns_the_label_word_and_leaves_the_lm_alone(kind):
    # a learning threshold on a random tiny model and data: seeded, so the check is stable (with
    # the run's seed, about one run in many drew a model LoRA fits to only 0.68 in 15 epochs)
    torch.manual_seed(12345)
    task = tiny_task(n_train=40, n_test=12)
    original = {k: v.clone() for k, v in task.model.state_dict().items()}
    method = AdapterTuning(kind, epochs=15, lr=3e-2 if kind == "lora" else 1e-1, batch_size=8)

    def train_loss(model) -> float:
        with torch.no_grad():
            logits = torch.stack([model(**task.tokenizer(p, return_tensors="pt")).logits[0, -1]
                                  for p in task.prompts("train")])
        return float(F.cross_entropy(logits, task.next_token_ids[task.labels("train")]))

    before = train_loss(task.model)
    method.fit(task)
    after = train_loss(method.model)
    assert after < 0.99 * before  # the training objective went down
    if kind == "lora":  # IA3 only rescales a random tiny model's activations: too weak to solve it
        saved = task.test
        task.test = task.train
        assert (method.predict(task) == task.labels("train")).float().mean() >= 0.8
        task.test = saved
    trainable = [n for n, p in method.model.named_parameters() if p.requires_grad]
    assert trainable and all(kind in n for n in trainable)
    for name, value in task.model.state_dict().items():  # the task's LM is untouched
        assert torch.equal(value, original[name]), name
    predicted = method.predict(task)
    with torch.no_grad():
        expected = [int(next_token_logits(method.model, task.tokenizer, p)[task.next_token_ids].argmax())
                    for p in task.prompts("test")]
    assert predicted.tolist() == expected


def test_bad_baseline_options():
    with pytest.raises(ValueError, match="shots"):
        InContextLearning(-1)
    with pytest.raises(ValueError, match="k must"):
        KNNPrompting(k=0)
    with pytest.raises(ValueError, match="kind"):
        AdapterTuning("prefix")


def test_task_training_subsets_by_sampling():
    from collections import Counter

    assert Counter(e.label for e in tiny_task(n_train=40, train_limit=6, train_sampling="per_class").train) == \
        {"pos": 6, "neg": 6}
    skewed = Counter(e.label for e in tiny_task(n_train=40, train_limit=15, train_sampling="skewed").train)
    assert sorted(skewed.values()) == [3, 12]
    with pytest.raises(ValueError, match="train_sampling must be one of"):
        tiny_task(train_limit=6, train_sampling="balanced")
    with pytest.raises(ValueError, match="needs a train_limit"):
        tiny_task(train_sampling="skewed")
