"""moe.hf against transformers' own blocks: every family in fp32 and bf16, per block and per model,
greedy generation, a save/load round trip, the experts-implementation interface, and the error paths.

The references are tiny random models built offline (moe.hf.tiny) with transformers' eager experts.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
import sys
from contextlib import contextmanager

import pytest
import torch

transformers = pytest.importorskip("transformers")

import moe  # noqa: E402
import moe.hf  # noqa: E402
from moe.hf import MoEBlock, MoEExperts  # noqa: E402
from moe.hf.families import FAMILIES, family_for  # noqa: E402
from moe.hf.tiny import TINY_FAMILIES, randomize, tiny_config, tiny_model  # noqa: E402
from moe.testing import assert_close, tolerance  # noqa: E402

transformers.logging.set_verbosity_error()

FAMILY = {f.name: f for f in FAMILIES}
TABLE_NAME = {"deepseek_v2_grouped": "deepseek_v2"}  # tiny variant -> its entry in the family table
# which FusedMoE tensors are the original ones (same storage); the others are converted once
SHARED = {"gpt_oss": {"w2_bias"}, "dbrx": set()}
ORIGINAL_NAME = {"w13": "gate_up_proj", "w2": "down_proj", "w13_bias": "gate_up_proj_bias",
                 "w2_bias": "down_proj_bias"}
VOCAB = 96


def _family(name: str):
    return FAMILY[TABLE_NAME.get(name, name)]


@functools.cache
def _reference(name: str) -> torch.nn.Module:
    """The fp32 reference (eager experts). Shared between tests: copy it, never change it."""
    return tiny_model(name)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models gain nothing from intra-op threads, and on a busy machine their spin-up dominates
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> a local directory holding its reference model, written by save_pretrained."""
    dirs: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in dirs:
            path = tmp_path_factory.mktemp(name)
            _reference(name).save_pretrained(path)
            dirs[name] = str(path)
        return dirs[name]

    return get


def _load(path: str, dtype: torch.dtype = torch.float32, experts: str = "eager") -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager", experts_implementation=experts
    ).eval()


def _ids(batch: int = 2, seq: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq))


def _blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if family_for(m) is not None}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _block_io(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> dict[str, tuple]:
    """(input, output) of each named block during one forward of ``model``."""
    io: dict[str, tuple] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: io.__setitem__(n, (a[0], o)))
             for n in names]
    with torch.no_grad():
        model(_ids())
    for h in hooks:
        h.remove()
    return io


def _boom(*args, **kwargs):
    raise AssertionError("the original transformers block or experts ran")


def _poison(monkeypatch, block: torch.nn.Module, family) -> None:
    """Make the original block and experts classes raise if anything still calls them."""
    module = sys.modules[type(block).__module__]
    monkeypatch.setattr(getattr(module, family.block_class), "forward", _boom)
    monkeypatch.setattr(getattr(module, family.experts_class), "forward", _boom)


def _original_tensors(block: torch.nn.Module, family) -> dict[str, torch.Tensor]:
    if family.name == "dbrx":
        return {}
    experts = block.experts
    return {ours: getattr(experts, theirs) for ours, theirs in ORIGINAL_NAME.items() if hasattr(experts, theirs)}


def _ours(block: MoEBlock) -> dict[str, torch.Tensor]:
    m = block.moe
    return {"w13": m.w13_weight, "w2": m.w2_weight, "w13_bias": m.w13_bias, "w2_bias": m.w2_bias}


@contextmanager
def _routing_records(original: torch.nn.Module, replaced: torch.nn.Module, names: list[str]):
    """Record the expert ids each block used: transformers' from its experts call, ours from FusedMoE."""
    theirs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    ours: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [original.get_submodule(n).experts.register_forward_pre_hook(
        lambda m, a, n=n: theirs[n].append(a[1].reshape(-1, a[1].shape[-1]))) for n in names]
    for n in names:
        layer = replaced.get_submodule(n).moe
        select = layer.select_experts

        def recorded(x, logits=None, select=select, n=n):
            weights, ids = select(x, logits)
            ours[n].append(ids)
            return weights, ids

        layer.select_experts = recorded
    yield theirs, ours
    for h in hooks:
        h.remove()
    for n in names:
        del replaced.get_submodule(n).moe.select_experts


def _same_sets(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[T] bool: token t chose the same set of experts in both."""
    return (a.long().sort(dim=-1).values == b.long().sort(dim=-1).values).all(dim=-1)


def _boundary_ties(block: torch.nn.Module, family, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T] bool: the k-th and (k+1)-th selection scores are equal, so either expert is a valid choice
    (moe takes the lower index; torch.topk does not say which it takes)."""
    logits = _first(getattr(block, family.router_attr)(x.reshape(-1, x.shape[-1])))
    scores = torch.softmax(logits, -1, dtype=logits.dtype) if family.name == "dbrx" else logits
    ordered = scores.float().sort(dim=-1, descending=True).values
    return ordered[:, top_k - 1] == ordered[:, top_k]


# ------------------------------------------------------------------------------------------ fp32
@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_fp32_logits_and_blocks_match(name, monkeypatch):
    family, ref = _family(name), _reference(name)
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
    new = copy.deepcopy(ref)
    originals = _blocks(new)
    names = moe.hf.replace_moe_blocks(new, backend="torch")
    assert names == list(originals) and names
    io = _block_io(ref, names, _ids())

    for n, old in originals.items():
        block = new.get_submodule(n)
        assert isinstance(block, MoEBlock) and block.family == family.name
        assert getattr(block, family.router_attr) is getattr(old, family.router_attr)  # kept, and called
        if family.shared_attr:
            assert block.moe.shared_experts is getattr(old, family.shared_attr)
        if family.shared_gate_attr:
            assert block.moe.shared_expert_gate is getattr(old, family.shared_gate_attr)
        shared = SHARED.get(family.name, {"w13", "w2"})
        for key, tensor in _original_tensors(old, family).items():
            same = _ours(block)[key].untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
            assert same == (key in shared), f"{n}: {key} shared={same}, expected {key in shared}"
    # drop the originals: nothing of them may run any more
    _poison(monkeypatch, next(iter(originals.values())), family)
    del originals
    assert not any(type(m).__name__ in (family.experts_class, family.block_class) for m in new.modules())

    with torch.no_grad():
        assert_close(new(ids).logits, want, what=f"{name} logits")
        assert moe.last_decision().chosen == "torch"
        for n, (x, out) in io.items():
            got = new.get_submodule(n)(x)
            assert_close(_first(got), _first(out), what=f"{name} {n}")
            if family.returns_router_scores:
                assert isinstance(got, tuple) and len(got) == 2
                assert_close(got[1], out[1], what=f"{name} {n} router scores")


def test_dense_layers_and_router_outputs_are_kept():
    ref = _reference("qwen2_moe")
    new = copy.deepcopy(ref)
    assert moe.hf.replace_moe_blocks(new) == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert type(new.model.layers[1].mlp).__name__ == "Qwen2MoeMLP"  # mlp_only_layers=[1] stays dense
    ids = _ids()
    with torch.no_grad():
        a, b = ref(ids, output_router_logits=True), new(ids, output_router_logits=True)
    assert len(b.router_logits) == 2  # the kept routers still feed the auxiliary loss
    for x, y in zip(b.router_logits, a.router_logits, strict=True):
        assert_close(x, y, what="router logits")
    assert_close(b.aux_loss, a.aux_loss, what="aux loss")


# ------------------------------------------------------------------------------------------ bf16
@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_bf16_within_bound(name, saved):
    """bf16: each block within the bf16 row of the original block on the same input (tokens whose top-k
    boundary is an exact tie excluded), and the logits within the bf16 row up to the first position
    where a routing decision differs between the two models (causal attention: earlier positions
    cannot see it)."""
    family = _family(name)
    ref = _load(saved(name), torch.bfloat16)
    new = _load(saved(name), torch.bfloat16)
    names = moe.hf.replace_moe_blocks(new)
    ids = _ids(2, 12)

    with _routing_records(ref, new, names) as (theirs, ours), torch.no_grad():
        want, got = ref(ids).logits, new(ids).logits
    agree = torch.stack([_same_sets(theirs[n][0], ours[n][0]) for n in names]).all(dim=0).view(ids.shape)
    valid = agree.long().cumprod(dim=1).bool()  # [B, S]: no routing difference at or before s
    assert valid.float().mean() >= 0.25, f"routing differs early: {agree.tolist()}"
    assert_close(got[valid], want[valid], dtype=torch.bfloat16, what=f"{name} bf16 logits")

    io = _block_io(ref, names, ids)
    with _routing_records(ref, new, names) as (theirs, ours), torch.no_grad():
        for n, (x, out) in io.items():
            block = new.get_submodule(n)
            y = _first(block(x))
            ref.get_submodule(n)(x)
            ties = _boundary_ties(ref.get_submodule(n), family, x, block.routing.top_k)
            differs = ~_same_sets(theirs[n][-1], ours[n][-1])
            assert not (differs & ~ties).any(), f"{n}: routing differs on tokens without a tie"
            assert ties.float().mean() <= 0.25
            keep = ~ties
            assert_close(y.reshape(-1, y.shape[-1])[keep], _first(out).reshape(-1, y.shape[-1])[keep],
                         dtype=torch.bfloat16, what=f"{name} {n} bf16")


# ------------------------------------------------------------------------------------------ generate, save/load
@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_greedy_generate_same_tokens(name):
    ref = _reference(name)
    new = copy.deepcopy(ref)
    moe.hf.replace_moe_blocks(new)
    prompt = _ids(2, 5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want, got = ref.generate(prompt, **kw), new.generate(prompt, **kw)
    assert want.shape == (2, 11) and torch.equal(got, want)


@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_save_load_round_trip(name, saved, tmp_path):
    """Load from a local directory, replace, compare; the replaced model's state dict is the original
    one (names, layout, values), so save_pretrained writes a checkpoint the original class loads, and
    load_state_dict takes an original state dict."""
    family, ref = _family(name), _reference(name)
    loaded = _load(saved(name))
    originals = _blocks(loaded)
    names = moe.hf.replace_moe_blocks(loaded)
    assert names == list(originals)
    for n, old in originals.items():
        for key, tensor in _original_tensors(old, family).items():
            if key in SHARED.get(family.name, {"w13", "w2"}):
                assert _ours(loaded.get_submodule(n))[key].data_ptr() == tensor.data_ptr()
    ids = _ids()
    with torch.no_grad():
        want = ref(ids).logits
        assert_close(loaded(ids).logits, want, what=f"{name} loaded")

    theirs, ours = ref.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs), "state dict values differ"
    loaded.save_pretrained(tmp_path)
    again = _load(str(tmp_path))
    assert not any(isinstance(m, MoEBlock) for m in again.modules())
    fresh = copy.deepcopy(ref)
    moe.hf.replace_moe_blocks(fresh)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
        fresh.load_state_dict(theirs, strict=True)
        assert_close(again(ids).logits, want, what=f"{name} saved after replacement")
        assert_close(fresh(ids).logits, want, what=f"{name} load_state_dict")


# ------------------------------------------------------------------------------------------ experts interface
def test_experts_implementation_interface(saved):
    model = copy.deepcopy(_reference("mixtral"))
    ids = _ids()
    with torch.no_grad():
        want = model(ids).logits
        model.set_experts_implementation("moe")
        assert model.config._experts_implementation == "moe"
        assert_close(model(ids).logits, want, what="set_experts_implementation")
        assert moe.last_decision() is not None
        loaded = _load(saved("qwen2_moe"), experts="moe")  # shared expert and dtype rounding stay transformers'
        assert_close(loaded(ids).logits, _reference("qwen2_moe")(ids).logits, what="from_pretrained moe")
        gpt = copy.deepcopy(_reference("gpt_oss"))
        gpt.set_experts_implementation("moe")
        with pytest.raises(ValueError, match=r"GptOssExperts stores its weights transposed .*replace_moe_blocks"):
            gpt(ids)
    name = moe.hf.register_experts_implementation("moe_torch", backend="torch")
    assert name in transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS
    with pytest.raises(ValueError, match="backend: unknown backend 'nope'"):
        moe.hf.register_experts_implementation("moe_nope", backend="nope")


# ------------------------------------------------------------------------------------------ generic and errors
def _phimoe() -> torch.nn.Module:
    """A family outside the table (PhiMoE: sparse-mixer routing), with standard fused experts."""
    config = transformers.PhimoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, pad_token_id=None, bos_token_id=None,
        eos_token_id=None, attn_implementation="eager", experts_implementation="eager",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.PhimoeForCausalLM(config)
        randomize(model)
    return model.eval()


def test_unknown_block_with_standard_experts_is_handled_generically():
    ref = _phimoe()
    new = copy.deepcopy(ref)
    original = new.model.layers[0].mlp.experts
    names = moe.hf.replace_moe_blocks(new, backend="torch")
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    experts = new.model.layers[0].mlp.experts
    assert isinstance(experts, MoEExperts)
    assert experts.w13_weight.data_ptr() == original.gate_up_proj.data_ptr()
    assert experts.w2_weight.data_ptr() == original.down_proj.data_ptr()
    assert type(new.model.layers[0].mlp).__name__ == "PhimoeSparseMoeBlock"  # keeps its own routing
    assert set(new.state_dict()) == set(ref.state_dict())  # saved in the original format
    ids = _ids()
    with torch.no_grad():
        assert_close(new(ids).logits, ref(ids).logits, what="phimoe generic")
    assert moe.last_decision().chosen == "torch"
    with pytest.raises(ValueError, match=r"PhimoeExperts \(at 'model.layers.0.mlp.experts'\) belongs to a block "
                                         r"class moe.hf does not know; supported block classes: MixtralSparseMoeBlock"):
        moe.hf.replace_moe_blocks(copy.deepcopy(ref), generic=False)


def test_generic_rejects_custom_gating_and_leaves_the_model_unchanged(monkeypatch):
    model = _phimoe()
    monkeypatch.setattr(type(model.model.layers[0].mlp.experts), "_apply_gate", lambda self, h: h)
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="PhimoeExperts defines its own gating"):
        moe.hf.replace_moe_blocks(model)
    assert [type(m) for m in model.modules()] == before


def test_no_moe_block():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"no sparse MoE block found in LlamaForCausalLM; supported block classes: "
                                         r"MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock, .*DbrxFFN"):
        moe.hf.replace_moe_blocks(model)


def test_replacing_twice_is_a_no_op():
    model = copy.deepcopy(_reference("olmoe"))
    assert len(moe.hf.replace_moe_blocks(model)) == 2
    assert moe.hf.replace_moe_blocks(model) == []


def test_bad_calls():
    model = copy.deepcopy(_reference("mixtral"))
    with pytest.raises(ValueError, match="backend: unknown backend 'cutlass_magic'"):
        moe.hf.replace_moe_blocks(model, backend="cutlass_magic")
    with pytest.raises(ValueError, match=r"the model is in training mode.*call model.eval\(\) first"):
        moe.hf.replace_moe_blocks(model.train())


def test_unsupported_activation_rolls_back():
    model = tiny_model("mixtral", hidden_act="relu")
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="MixtralExperts: activation 'relu' has no exact counterpart in moe's "
                                         "activation table; supported: silu, swish, gelu, gelu_pytorch_tanh"):
        moe.hf.replace_moe_blocks(model)
    assert [type(m) for m in model.modules()] == before


def test_quantized_or_unknown_layouts_are_rejected():
    model = copy.deepcopy(_reference("mixtral"))
    experts = model.model.layers[1].mlp.experts
    experts.gate_up_proj = torch.nn.Parameter(torch.zeros(8, 80, 32, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match=r"MixtralExperts: gate_up_proj is \(8, 80, 32\) torch.uint8, expected a "
                                         "3-D unquantized float tensor"):
        moe.hf.replace_moe_blocks(model)
    assert isinstance(model.model.layers[0].mlp, transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock)
    del experts.gate_up_proj
    with pytest.raises(ValueError, match=r"no gate_up_proj/down_proj tensors \(found parameters: \['down_proj'\]\)"):
        moe.hf.replace_moe_blocks(model)


def test_unknown_deepseek_v2_topk_method():
    model = copy.deepcopy(_reference("deepseek_v2"))
    model.model.layers[1].mlp.gate.topk_method = "noaux_tc"
    with pytest.raises(ValueError, match="topk_method='noaux_tc' is not supported; supported: 'greedy', "
                                         "'group_limited_greedy'"):
        moe.hf.replace_moe_blocks(model)


def test_tiny_config_rejects_unknown_family():
    with pytest.raises(ValueError, match="tiny_config: unknown family 'switch'; known: mixtral"):
        tiny_config("switch")


def test_bf16_row_is_the_documented_bound():
    assert tolerance(torch.bfloat16) == 1e-2  # docs/hf.md quotes it


# ------------------------------------------------------------------------------------------ hf-check
def _check_args(model: str, **over) -> argparse.Namespace:
    from moe.hf.check import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([model, "--repeat", "1", "--seq", "6", *over.pop("extra", [])])
    return args


def test_hf_check_family_and_directory(saved, capsys):
    from moe.hf.check import run

    assert run(_check_args("olmoe", extra=["--backend", "torch"])) == 0
    out = capsys.readouterr().out
    assert "replaced 2 blocks: model.layers.0.mlp, model.layers.1.mlp" in out
    assert "backend: requested 'torch', ran 'torch'" in out
    assert re.search(r"logits: norm-relative difference \S+ \(tolerance for float32: 1e-05\) ok", out)
    assert re.search(r"forward: before [\d.]+ ms, after [\d.]+ ms", out)
    assert run(_check_args(saved("dbrx"), extra=["--dtype", "bfloat16"])) == 0
    assert "DbrxForCausalLM, bfloat16" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="'switch' is neither a directory nor a family"):
        run(_check_args("switch"))
