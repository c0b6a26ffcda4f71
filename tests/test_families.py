"""The same code runs with two LLM families (Llama and Qwen2 chat templates and layers)."""

import pytest
import torch
from conftest import noise

from echox.model.generation import SamplingConfig
from echox.model.prompt import IGNORE, Turn


@pytest.mark.parametrize("family,end", [("llama", "<|eot_id|>"), ("qwen2", "<|im_end|>")])
def test_llm_family(make_model, family, end):
    m = make_model([f"llm.name_or_path=builtin:tiny-random-{family}"])
    assert m.llm.base.config.model_type == family
    dl = [[Turn("user", audio=noise(0.7), transcript="hey"), Turn("assistant", text="Hi there!")]]
    enc = m.prompt.encode(dl[0])
    assert m.tokenizer.decode([t for t in enc.labels if t != IGNORE]).startswith("Hi there!" + end)
    m.train()
    out = m.forward_s2t(m.collate(dl))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    lora_grads = [p.grad for n, p in m.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    m.eval()
    g = m.generate_text([dl[0][:1]], SamplingConfig(max_new_tokens=5))
    assert len(g.token_ids[0]) == g.hidden[0].shape[0] > 0
    assert m.llm.stop_ids == [m.tokenizer.convert_tokens_to_ids(end)]
