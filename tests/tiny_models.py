"""Tiny random Hugging Face causal LMs built from configs (no download), and a word tokenizer."""

from __future__ import annotations

import torch


def tiny_gpt2(vocab: int = 97, d: int = 16):
    """GPT-2: tied head, no bias."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(vocab: int = 89, d: int = 16, context: int = 2048):
    """Llama: untied head, no bias."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0, max_position_embeddings=context)
    return LlamaForCausalLM(cfg).eval()


def tiny_phi(vocab: int = 101, d: int = 16):
    """Phi: untied head with a bias."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(vocab_size=vocab, hidden_size=d, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, bos_token_id=0, eos_token_id=0)
    return PhiForCausalLM(cfg).eval()


def _tiny_decoder(config_cls, model_cls, vocab: int, d: int, **extra):
    cfg = config_cls(vocab_size=vocab, hidden_size=d, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=0,
                     pad_token_id=0, **extra)
    return model_cls(cfg).eval()


def tiny_qwen2(vocab: int = 83, d: int = 16):
    """Qwen2: attention biases, untied head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny_decoder(Qwen2Config, Qwen2ForCausalLM, vocab, d, tie_word_embeddings=False)


def tiny_gemma(vocab: int = 79, d: int = 16):
    """Gemma: tied head, embeddings scaled by sqrt(d)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    return _tiny_decoder(GemmaConfig, GemmaForCausalLM, vocab, d, head_dim=8)


def tiny_mistral(vocab: int = 73, d: int = 16):
    """Mistral: sliding-window attention, untied head."""
    from transformers import MistralConfig, MistralForCausalLM

    return _tiny_decoder(MistralConfig, MistralForCausalLM, vocab, d, sliding_window=4, tie_word_embeddings=False)


def tiny_gemma2(vocab: int = 79, d: int = 16):
    """Gemma 2: caps its final logits (final_logit_softcapping)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _tiny_decoder(Gemma2Config, Gemma2ForCausalLM, vocab, d, head_dim=8)


class WordTokenizer:
    """Splits on spaces into known words ("Ġword" ids) and single characters, GPT-2 style."""

    def __init__(self, words: list[str], vocab_size: int):
        self.vocab = {f"Ġ{w}": i + 1 for i, w in enumerate(words)}
        self.vocab_size = vocab_size

    def _encode(self, text: str) -> list[int]:
        ids = []
        for piece in text.split(" ")[1:] if text.startswith(" ") else text.split(" "):
            key = f"Ġ{piece}"
            if key in self.vocab:
                ids.append(self.vocab[key])
            else:  # unknown words split into characters; the last one ends the word
                ids.extend(len(self.vocab) + 1 + (ord(c) % (self.vocab_size - len(self.vocab) - 1)) for c in piece)
        return ids

    def __call__(self, text: str, add_special_tokens: bool = True, return_tensors=None):
        ids = self._encode(text)
        if return_tensors == "pt":
            t = torch.tensor([ids])
            return {"input_ids": t, "attention_mask": torch.ones_like(t)}
        return {"input_ids": ids}

    def decode(self, ids) -> str:
        inverse = {i: w for w, i in self.vocab.items()}
        return "".join(inverse.get(i, f"<{i}>").replace("Ġ", " ") for i in ids)


def word_tokenizer_fast(words: list[str]):
    """A real (fast) Hugging Face tokenizer over a word-level vocabulary, built in memory:
    supports batches, padding and padding_side like any pretrained one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]")
