"""Shared fixtures: tiny models built from Transformers configs (nothing is downloaded)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess

import pytest
import torch
from torch import nn

torch.set_num_threads(1)

VOCAB = 64


def communicate_or_kill(process: subprocess.Popen, timeout: float, what: str) -> tuple[str, str | None]:
    """``process.communicate()`` within ``timeout`` s; past it, kill the process's whole group (it must have
    been started with ``start_new_session=True``, so that its children die too) and fail the test with the
    end of its output."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{what} did not finish within {timeout} s:\n{(stderr or stdout or '')[-5000:]}")


class MLPLayerNorm(nn.Module):
    """The custom model of PEFT's LN tuning tests: LayerNorm -> Linear -> ReLU -> LayerNorm -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.layernorm0 = nn.LayerNorm(10)
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.layernorm1 = nn.LayerNorm(20)
        self.lin1 = nn.Linear(20, 2)

    def forward(self, X):
        X = self.layernorm0(X.float())
        X = self.relu(self.lin0(X))
        X = self.layernorm1(X)
        return torch.log_softmax(self.lin1(X), dim=-1)


def _tiny_config(kind: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if kind == "llama":
        return tf.LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            **common,
        )
    if kind == "qwen2":
        return tf.Qwen2Config(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            **common,
        )
    if kind == "gemma":
        return tf.GemmaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            **common,
        )
    if kind == "gpt2":
        return tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=64, **common)
    if kind == "opt":
        return tf.OPTConfig(
            hidden_size=16,
            ffn_dim=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            word_embed_proj_dim=16,
            max_position_embeddings=64,
            **common,
        )
    if kind == "bert":
        return tf.BertConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            num_labels=3,
            **common,
        )
    if kind == "t5":
        return tf.T5Config(d_model=16, d_ff=32, d_kv=8, num_layers=2, num_heads=2, decoder_start_token_id=0, **common)
    if kind == "bart":
        return tf.BartConfig(
            d_model=16,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            max_position_embeddings=64,
            **common,
        )
    if kind == "vit":
        return tf.ViTConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
            num_labels=3,
        )
    raise ValueError(kind)


def make_tiny_model(kind: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model in eval mode; the same ``seed`` gives the same weights.

    ``kind``: llama, qwen2, gemma, gpt2, opt (causal LM); bert, vit (sequence/image classification);
    t5, bart (seq2seq LM); mlp (`MLPLayerNorm`).
    """
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "mlp":
        return MLPLayerNorm().eval()
    config = _tiny_config(kind)
    if kind in ("t5", "bart"):
        model = tf.AutoModelForSeq2SeqLM.from_config(config)
    elif kind == "bert":
        model = tf.AutoModelForSequenceClassification.from_config(config)
    elif kind == "vit":
        model = tf.ViTForImageClassification(config)
    else:
        model = tf.AutoModelForCausalLM.from_config(config)
    return model.eval()


def make_inputs(kind: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    """Inputs for `make_tiny_model(kind)`: keyword arguments for its forward."""
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"X": torch.arange(90).view(9, 10)}
    if kind == "vit":
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=g)}
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    if kind in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (batch, 4), generator=g)}
    return {"input_ids": ids}


def model_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture
def tiny_model():
    return make_tiny_model


@pytest.fixture
def perturb():
    """Add seeded noise to every trainable parameter (makes an adapter differ from identity)."""

    def _perturb(model: nn.Module, scale: float = 0.1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters()):
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)

    return _perturb


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def trainable_names(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model`` that require grad."""
    return {name for name, param in model.named_parameters() if param.requires_grad}


def sgd_steps(model: nn.Module, inputs: dict, steps: int = 3, lr: float = 0.5) -> list[float]:
    """Train the parameters that require grad with plain SGD on a fixed loss; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model_output(model, inputs).float().square().mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
