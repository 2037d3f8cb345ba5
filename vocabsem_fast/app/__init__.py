"""The VDS application, built on the library: adapting a causal LM to text classification with
vocabulary-defined semantics, its baselines and evaluation, and the ``vocabsem`` command line.

    classifier            ``TextClassifier``: fit, predict, save and load an adapted LM
    estimators, probe     what each of its methods fits; saving: the folder it is saved to
    data, tasks           data folders and prompted classification tasks
    representations       cached last-layer representations of prompts
    semantic_clustering   the paper's clustering module and ``VDSClassifier``
    data_parallel         fitting it data-parallel over local processes
    baselines             ICL, retrieval ICL, kNN prompting, LoRA / IA3
    evaluation            methods, metrics and analysis over data sets
    models, lens, cli     model loading, the vocabulary lens and the command line

The library (``vocabsem_fast`` outside this subpackage) never imports from here.
"""

from .classifier import TextClassifier

__all__ = ["TextClassifier"]
