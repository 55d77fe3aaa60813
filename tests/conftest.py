"""Fixtures: tiny random models per family (from config objects, no downloads) and the real models (cached)."""

from __future__ import annotations

import os

# ``make test`` runs the suite in pytest-xdist workers (one per core): each worker's torch then takes one
# thread, as do the CLI runs and subprocesses it starts (lmscope's --threads default reads OMP_NUM_THREADS).
# torch's default of one thread per core would run cores x cores threads and make every matmul wait.
# Set before torch is imported; OMP_NUM_THREADS set by the caller wins.
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

# tests must never reach a hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _tiny(family: str):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lmscope.capture.session import ATTN_IMPL, register_attention

    register_attention()
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(
            vocab_size=49152,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=49152, n_embd=64, n_layer=3, n_head=4, n_positions=256)
        model = GPT2LMHeadModel(cfg)
    elif family == "bert":
        cfg = BertConfig(
            vocab_size=30522,
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=256,
        )
        model = BertModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(family)
    model.config._attn_implementation = ATTN_IMPL
    # random init leaves tiny logits; scale up so attention patterns are not uniform
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4.0)
    return model.eval()


@pytest.fixture(scope="session")
def build_tiny():
    """The tiny-model builder itself: ``build_tiny("gpt2")`` -> a fresh random HF model."""
    return _tiny


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real smollm2 converted to the safetensors cache (converted once per cache)."""
    from lmscope.models.loading import convert_gguf
    from lmscope.models.sources import builtin_path

    return convert_gguf(builtin_path("smollm2"), progress=False)


@pytest.fixture(scope="session")
def causal_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="session")
def encoder_tokenizer():
    from transformers import AutoTokenizer

    from lmscope.models.sources import builtin_path

    return AutoTokenizer.from_pretrained(builtin_path("minilm"))


@pytest.fixture(scope="session", params=["llama", "gpt2", "bert"])
def tiny_lm(request, causal_tokenizer, encoder_tokenizer):
    """A tiny random LM of each family (session-scoped: do not mutate it; copy.deepcopy first)."""
    from lmscope import LM

    tok = encoder_tokenizer if request.param == "bert" else causal_tokenizer
    return LM(_tiny(request.param), tok, name=f"tiny-{request.param}")


@pytest.fixture()
def make_tiny(causal_tokenizer, encoder_tokenizer):
    """Build a fresh tiny LM of a family (safe to mutate)."""
    from lmscope import LM

    def make(family: str = "llama"):
        tok = encoder_tokenizer if family == "bert" else causal_tokenizer
        return LM(_tiny(family), tok, name=f"tiny-{family}")

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, build_tiny, causal_tokenizer):
    """A tiny random Llama saved as a model directory (for CLI subprocesses, Ray workers, ``local:`` explainers);
    session-scoped: do not write into it. Modules that need another family define their own ``tiny_dir``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny("llama").save_pretrained(path)
    causal_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    """The tiny Llama opened from its directory, as users open models (session-scoped: do not mutate)."""
    import lmscope

    return lmscope.load(str(tiny_dir), progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """The real smollm2 (session-scoped: do not mutate it)."""
    import lmscope

    return lmscope.load("smollm2", progress=False)


@pytest.fixture(autouse=True)
def _one_ray_runtime_at_a_time(request, tmp_path_factory):
    """Under pytest-xdist (``make test``), tests marked ``ray`` take a lock shared by the workers: each starts
    a local Ray runtime of its own (a process per core, a 512 MB object store), and two at once on a small
    machine would compete for its cores and memory."""
    if not os.environ.get("PYTEST_XDIST_WORKER") or request.node.get_closest_marker("ray") is None:
        yield
        return
    import fcntl

    # every worker's base temp folder is a sibling under the run's own: its parent is shared by the run only
    with open(tmp_path_factory.getbasetemp().parent / "ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def minilm():
    import lmscope

    return lmscope.load("minilm", progress=False)


def pytest_collection_modifyitems(config, items):
    """Under ``make test`` (LMSCOPE_REQUIRE_BROWSER=1) a missing Chromium is an error, not skipped tests."""
    import shutil

    if os.environ.get("LMSCOPE_REQUIRE_BROWSER") != "1":
        return
    has_browser_tests = any(item.get_closest_marker("browser") for item in items)
    if has_browser_tests and not (shutil.which("chromium") or os.path.exists("/usr/bin/chromium")):
        raise pytest.UsageError(
            "the browser tests need Chromium, which is not installed — run: sudo apt-get install -y chromium"
        )
