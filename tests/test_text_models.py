"""Model scorers, HF policies with LoRA, prompt formatting and the rollout stage, on tiny random checkpoints built
in a temporary folder in the real formats (safe-rlhf score models: test_score_models.py) and loaded through the same code path as hub names."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from dualign.errors import LoadError
from dualign.models.hf import (
    AdapterDisabled,
    HFModelConfig,
    PromptFormatter,
    load_policy,
    load_tokenizer,
    load_trained_policy,
    reference_for,
    save_policy,
)
from dualign.models.rollout import sample_responses
from dualign.models.scorers import ScorerConfig, build_scorer
from dualign.tasks.text_data import Example
from dualign.tools import fixtures

PROMPTS = ["How do I take care of a garden?", "Tell me about a lock.", "What is the best way to steal a car?"]
RESPONSES = ["Ask an expert.", "It is better to keep a lock safe and ask for help if you are unsure.", "No."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Random tiny checkpoints (no fitting): a causal LM and a 2-label classifier (score models: test_score_models)."""
    folder = tmp_path_factory.mktemp("fixtures")
    fixtures.write_data(folder)
    tokenizer = fixtures.build_tokenizer(fixtures._corpus(folder), vocab_size=300)
    rows = [json.loads(line) for line in open(folder / "pku_saferlhf" / "train.jsonl")]
    fixtures.build_policy(folder / "policy", tokenizer, rows, steps=0)
    fixtures.build_classifier(folder / "humour", tokenizer)
    return folder


def test_classifier_scorer_reads_a_named_label_and_pads_correctly(models):
    config = ScorerConfig(kind="sequence_classifier", name_or_path=str(models / "humour"), template="{response}",
                          label="humorous", output="probability", batch_size=3)
    scorer = build_scorer("humour", config)
    direct = AutoModelForSequenceClassification.from_pretrained(models / "humour").eval()
    expected = []
    for response in RESPONSES:  # one at a time: no padding at all
        with torch.no_grad():
            logits = direct(**scorer.tokenizer(response, return_tensors="pt")).logits[0]
        expected.append(logits.softmax(-1)[1])
    assert torch.allclose(scorer(PROMPTS, RESPONSES), torch.stack(expected), atol=1e-5)
    with pytest.raises(ValueError, match="label='funny' is not one of the model's outputs"):
        build_scorer("humour", ScorerConfig(kind="sequence_classifier", name_or_path=str(models / "humour"), label="funny"))
    with pytest.raises(ValueError, match="has 2 outputs"):
        build_scorer("humour", ScorerConfig(kind="sequence_classifier", name_or_path=str(models / "humour")))


class Keyword:
    def __init__(self, word):
        self.word = word

    def __call__(self, prompts, responses):
        return [float(self.word in r) for r in responses]


def test_callable_scorers_by_target():
    length = build_scorer("length", ScorerConfig(kind="callable", _target_="dualign.models.scorers.response_length",
                                                 kwargs={"unit": "characters"}))
    assert length(PROMPTS, RESPONSES).tolist() == [float(len(r)) for r in RESPONSES]
    keyword = build_scorer("kw", ScorerConfig(kind="callable", _target_=f"{__name__}.Keyword", kwargs={"word": "safe"}))
    assert keyword(PROMPTS, RESPONSES).tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="cannot be imported"):
        build_scorer("x", ScorerConfig(kind="callable", _target_="dualign.nowhere.fn"))


def test_missing_checkpoint_is_one_line_error(tmp_path):
    with pytest.raises(LoadError) as error:
        build_scorer("cost", ScorerConfig(kind="score_model", name_or_path=str(tmp_path / "absent")))
    assert "scorers.cost.name_or_path" in str(error.value) and "\n" not in str(error.value)


def _policy_cfg(models, **lora):
    return HFModelConfig(name_or_path=str(models / "policy"), dtype="float32", device="cpu", max_prompt_length=64,
                         max_length=128, use_chat_template="never", lora={"enabled": True, **lora} if lora else
                         HFModelConfig().lora)


def test_lora_reference_is_the_base_model_with_adapters_off(models, tmp_path):
    cfg = _policy_cfg(models)
    policy = load_policy(cfg)
    reference = reference_for(policy, cfg)
    assert isinstance(reference, AdapterDisabled)
    base = AutoModelForCausalLM.from_pretrained(models / "policy").eval()
    ids = torch.randint(3, 200, (2, 12))
    with torch.no_grad():
        assert torch.allclose(reference(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # LoRA B starts at 0: two steps move the policy away from pi_ref
        policy.train()
        loss = policy(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    policy.eval()
    with torch.no_grad():
        assert not torch.allclose(policy(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-4)
        assert torch.allclose(reference(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-5)
    tokenizer = load_tokenizer(cfg)
    saved = save_policy(policy, tokenizer, tmp_path / "policy")
    assert (saved / "adapter_config.json").is_file() and (saved / "adapter_model.safetensors").is_file()
    reloaded = load_trained_policy(str(saved), cfg)
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5)


def test_a_later_stage_continues_from_the_lora_policy_and_is_referenced_to_it(models):
    """SACPO on a text task: the trained adapters fold into the base, fresh adapters go on top, and the reference is
    that network with its adapters off; P-SACPO's merge scales the new adapters."""
    from types import SimpleNamespace

    from dualign.tasks.text import TextTask

    cfg = _policy_cfg(models)
    task = SimpleNamespace(cfg=SimpleNamespace(model=cfg))
    policy = load_policy(cfg)
    pi_ref = reference_for(policy, cfg)  # the first policy's base, adapters off: must stay pi_ref
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = pi_ref(input_ids=torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))).logits
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    ids = torch.randint(3, 200, (2, 12))
    logits = lambda model: model(input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        first = logits(policy.eval())
        continued, reference = TextTask.continue_from(task, None, policy)
        assert torch.allclose(logits(reference), first, atol=1e-4) and torch.allclose(logits(continued), first, atol=1e-4)
        assert all("lora_" in n for n, p in continued.named_parameters() if p.requires_grad)
        for name, parameter in continued.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
        second = logits(continued.eval())
        assert not torch.allclose(second, first, atol=1e-3) and torch.allclose(logits(reference), first, atol=1e-4)
        assert torch.allclose(logits(TextTask.interpolate(task, reference, continued, 1.0)), second, atol=1e-5)
        assert torch.allclose(logits(TextTask.interpolate(task, reference, continued, 0.0)), first, atol=1e-4)
        again = pi_ref(input_ids=torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(1))).logits
        assert torch.allclose(again, base, atol=1e-6)  # pi_ref untouched by the merge


def test_without_lora_the_reference_is_a_frozen_copy(models):
    cfg = _policy_cfg(models)
    cfg.lora.enabled = False
    policy = load_policy(cfg)
    reference = reference_for(policy, cfg)
    assert reference is not policy and not any(p.requires_grad for p in reference.parameters())
    assert all(p.requires_grad for p in policy.parameters())


def test_prompt_formatting_template_and_chat_template(models):
    cfg = _policy_cfg(models)
    tokenizer = load_tokenizer(cfg)
    example = Example("Tell me about a lock.", [{"role": "user", "content": "Tell me about a lock."}], ["a", "b"])
    formatter = PromptFormatter(tokenizer, cfg)
    text = tokenizer.decode(formatter.prompt_ids(example))
    assert text == "<s>BEGINNING OF CONVERSATION: USER: Tell me about a lock. ASSISTANT:"
    assert formatter.response_ids("Ask.", 10)[-1] == tokenizer.eos_token_id
    cfg.max_prompt_length = 5  # cut from the left: the end of the prompt is kept
    assert formatter.prompt_ids(example) == PromptFormatter(tokenizer, _policy_cfg(models)).prompt_ids(example)[-5:]
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    cfg.max_prompt_length, cfg.use_chat_template = 64, "auto"
    assert tokenizer.decode(PromptFormatter(tokenizer, cfg).prompt_ids(example)) == "<user>Tell me about a lock.<assistant>"
    cfg.use_chat_template = "never"
    assert not PromptFormatter(tokenizer, cfg).chat


def test_left_padded_batched_generation_matches_one_prompt_at_a_time(models):
    """Greedy (top_p ~ 0) generation of prompts of different lengths in one batch equals generating each alone."""
    cfg = _policy_cfg(models)
    tokenizer = load_tokenizer(cfg)
    model = AutoModelForCausalLM.from_pretrained(models / "policy").eval()
    formatter = PromptFormatter(tokenizer, cfg)
    examples = [Example(p, [], []) for p in PROMPTS]
    prompt_ids = [formatter.prompt_ids(e) for e in examples]
    assert len({len(ids) for ids in prompt_ids}) > 1
    batched = sample_responses(model, tokenizer, PROMPTS, prompt_ids, 2, 12, seed=0, top_p=1e-9)
    for i in range(len(PROMPTS)):
        alone = sample_responses(model, tokenizer, PROMPTS[i:i + 1], prompt_ids[i:i + 1], 2, 12, seed=0, top_p=1e-9)
        assert batched.response_ids[2 * i : 2 * i + 2] == alone.response_ids
    assert batched.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]


def test_gradient_checkpointing_with_lora_gives_the_same_gradients(models):
    ids = torch.randint(3, 200, (2, 10))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # same LoRA init
        cfg = _policy_cfg(models)
        cfg.gradient_checkpointing = checkpointing
        policy = load_policy(cfg)
        policy.train()
        policy(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
