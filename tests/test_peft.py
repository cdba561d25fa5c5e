"""PEFT interop: our adapters saved as a PEFT LoRA adapter load into transformers' GptOss with
the same logits, and adapters PEFT trained (attention and experts) load into ours with PEFT's
logits; an adapter that does not fit is one line."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanogptoss_jax.data.tokenizer import FullTokenizer
from nanogptoss_jax.errors import UserError
from nanogptoss_jax.interop.peft_adapter import AdapterError, load_adapter, save_adapter
from nanogptoss_jax.model.config import GptOssConfig
from nanogptoss_jax.model.execution import ExecutionConfig
from nanogptoss_jax.model.gptoss import GptOss, from_loop_flat_state
from nanogptoss_jax.model.lora import LoraConfig, add_lora
from nanogptoss_jax.pretrained.export import save_pretrained
from tests.lora_helpers import randomize
from tests.factories import relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
TOLERANCE = 1e-5
CFG = GptOssConfig(num_hidden_layers=2, num_experts=4, experts_per_token=2, hidden_size=32,
                   intermediate_size=32, head_dim=8, num_attention_heads=4, num_key_value_heads=2,
                   sliding_window=4, rope_scaling_factor=1.0)
LORA = LoraConfig(rank=4, alpha=8.0)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 7), dtype=np.int32)


def _base(layers_impl="loop", cfg=CFG) -> GptOss:
  """The same numbers in either layout (randomized in the loop layout, then laid out)."""
  model = GptOss(cfg, execution=ExecutionConfig(layers_impl="loop"), rngs=nnx.Rngs(3))
  randomize(model, lambda path, _: path[-1] in ("bias", "sinks", "mlp1_bias", "mlp2_bias"), 5, 0.1)
  flat = dict(nnx.to_flat_state(nnx.state(model)))
  return from_loop_flat_state(cfg, ExecutionConfig(layers_impl=layers_impl), flat)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  save_pretrained(_base(), FullTokenizer(), str(path), dtype="float32")
  return str(path)


def _hf(path):
  model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
  return model.float().eval()


def _logits(model) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS, dtype=torch.long)).logits.numpy()


def test_our_adapter_loads_in_peft_with_our_logits(hf_dir, tmp_path):
  model = add_lora(_base(), LORA, seed=1)
  randomize(model, lambda path, _: path[-1] == "lora_b", 2, 0.2)
  save_adapter(model, str(tmp_path))
  theirs = _logits(peft.PeftModel.from_pretrained(_hf(hf_dir), str(tmp_path)))
  assert relative_error(_logits(_hf(hf_dir)), theirs) > 1e-3  # the adapter matters
  assert relative_error(model(jnp.asarray(TOKENS)), theirs) <= TOLERANCE


@pytest.mark.parametrize("layers_impl", ["loop", "scan"])
def test_an_adapter_peft_wrote_loads_with_peft_logits(hf_dir, tmp_path, layers_impl):
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                "o_proj"],
                           target_parameters=["mlp.experts.gate_up_proj",
                                              "mlp.experts.down_proj"])
  tuned = peft.get_peft_model(_hf(hf_dir), config)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, parameter in tuned.named_parameters():
      if "lora_B" in name:  # PEFT starts B at zero; trained ones are not
        parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
  tuned.save_pretrained(str(tmp_path))
  theirs = _logits(tuned.eval())
  model = load_adapter(_base(layers_impl), str(tmp_path))
  assert relative_error(model(jnp.asarray(TOKENS)), theirs) <= TOLERANCE


# Five layers, the experts of layers 1, 2 and 4 only (a full, a sliding and the odd last layer
# in the scan layout), as OpenAI's recipe adapts layers 7, 15 and 23 of gpt-oss-20b.
FIVE = CFG.replace(num_hidden_layers=5)
SOME = LoraConfig(rank=4, alpha=8.0, expert_layers=(1, 2, 4))


@pytest.fixture(scope="module")
def hf_five(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf5")
  save_pretrained(_base(cfg=FIVE), FullTokenizer(), str(path), dtype="float32")
  return str(path)


@pytest.mark.parametrize("layers_impl", ["loop", "scan"])
def test_some_layers_experts_load_from_peft_as_openais_recipe_writes_them(hf_five, tmp_path,
                                                                           layers_impl):
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                           target_parameters=[f"{layer}.mlp.experts.{name}" for layer in (1, 2, 4)
                                              for name in ("gate_up_proj", "down_proj")])
  tuned = peft.get_peft_model(_hf(hf_five), config)
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, parameter in tuned.named_parameters():
      if "lora_B" in name:
        parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
  tuned.save_pretrained(str(tmp_path))
  theirs = _logits(tuned.eval())
  model = load_adapter(_base(layers_impl, cfg=FIVE), str(tmp_path))
  assert model.lora_config.expert_layers == (1, 2, 4)
  assert relative_error(model(jnp.asarray(TOKENS)), theirs) <= TOLERANCE


def test_some_layers_experts_saved_load_in_peft_with_our_logits(hf_five, tmp_path):
  model = add_lora(_base("scan", cfg=FIVE), SOME, seed=1)
  randomize(model, lambda path, _: path[-1] == "lora_b", 2, 0.2)
  save_adapter(model, str(tmp_path))
  loaded = peft.PeftModel.from_pretrained(_hf(hf_five), str(tmp_path))
  # PEFT adapts those layers' experts only (a missing tensor would load as a zero update).
  adapted = {int(name.split(".layers.")[1].split(".")[0])
             for name, _ in loaded.named_parameters() if "experts" in name and "lora_A" in name}
  assert adapted == {1, 2, 4}
  assert relative_error(model(jnp.asarray(TOKENS)), _logits(loaded)) <= TOLERANCE


def test_an_adapter_that_does_not_fit_is_one_line(tmp_path):
  model = add_lora(_base(), LORA, seed=1)
  save_adapter(model, str(tmp_path))
  with pytest.raises(AdapterError, match="the model has adapters"):
    load_adapter(add_lora(_base(), LoraConfig(rank=8)), str(tmp_path))
  other = CFG.replace(intermediate_size=64)
  with pytest.raises(AdapterError, match="another base"):
    load_adapter(_base(cfg=other), str(tmp_path))
  with pytest.raises(AdapterError, match="not a PEFT adapter"):
    load_adapter(_base(), str(tmp_path / "nothing"))
  with pytest.raises(UserError, match="merge_lora"):
    save_pretrained(model, FullTokenizer(), str(tmp_path / "export"))
  config_path = tmp_path / "adapter_config.json"
  config = json.loads(config_path.read_text())
  for parameters, match in [(["1.mlp.experts.gate_up_proj", "2.mlp.experts.down_proj"],
                             "different expert matrices on different layers"),
                            (["mlp.experts.gate_up_proj", "1.mlp.experts.gate_up_proj"],
                             "mixes every layer's experts with some layers'"),
                            (["1.mlp.experts.gate_up_proj", "9.mlp.experts.gate_up_proj"],
                             r"\[9\] are beyond this model's 2 layers")]:
    config_path.write_text(json.dumps({**config, "target_parameters": parameters}))
    with pytest.raises(UserError, match=match):
      load_adapter(_base(), str(tmp_path))
