"""dualign's DPO loss and chosen/rejected log-ratios equal TRL DPOTrainer's on the same tiny model and batch (hard
labels). TRL is a test-only dependency; it tokenizes the text, and dualign is fed TRL's own token ids."""
import copy
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")

from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from dualign.data import sequence_logprobs, tokenized  # noqa: E402
from dualign.policy_steps import DPOStep  # noqa: E402
from dualign.rollout import Rollouts  # noqa: E402

from conftest import ROOT  # noqa: E402

PROMPTS = ["How do I fix a lock?", "Tell me a joke about cars please", "What is a safe way to store a knife?"]
CHOSEN = [" Call a locksmith.", " Why did the car stop? It was tired.", " In a block, blade down."]
REJECTED = [" Break it.", " No.", " Anywhere, who cares, just leave it on the table for the kids."]
BETA = 0.1


@pytest.fixture(scope="module")
def trainer():
    import datasets

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "tiny_models" / "policy")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # float64 models: the comparison is of the formulas, not of float32 summation order (log-probs of ~-200 carry
    # ~1e-5 of float32 rounding, the size of the tolerance)
    reference = GPT2LMHeadModel(config).double().eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # the policy has moved away from the reference
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    data = datasets.Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=BETA, loss_type=["sigmoid"], per_device_train_batch_size=3,
                         bf16=False, report_to=[], max_steps=1)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer)
    trainer.model.eval()
    return trainer


def _dualign(trainer, examples):
    """DPOStep on TRL's token ids: y0 = rejected, y1 = chosen, hard label 'y1 wins'."""
    prompt_ids = [e["prompt_ids"] for e in examples]
    rollouts = Rollouts(torch.arange(len(examples)).repeat_interleave(2),
                        [ids for e in examples for ids in (e["rejected_ids"], e["chosen_ids"])], [], [])
    pad = trainer.processing_class.pad_token_id
    input_ids, attention_mask, response_mask = tokenized(prompt_ids, rollouts, pad)
    ref_logps = sequence_logprobs(trainer.ref_model, input_ids, attention_mask, response_mask)
    pair = lambda t: t.view(len(examples), 2, *t.shape[1:])  # noqa: E731
    batch = {"input_ids": pair(input_ids), "attention_mask": pair(attention_mask), "response_mask": pair(response_mask),
             "ref_logps": pair(ref_logps), "reward": torch.tensor([[0.0, 1.0]] * len(examples)),
             "utility": torch.zeros(len(examples), 0, 2), "label_uniform": torch.zeros(len(examples), 1)}
    with torch.no_grad():
        return DPOStep(BETA, labels="hard")(trainer.model, batch, torch.zeros(0), 0)


@pytest.mark.parametrize("rows", [[0], [1], [2], [0, 1, 2]])
def test_loss_and_log_ratios_equal_trl(trainer, rows):
    examples = [trainer.train_dataset[i] for i in rows]
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    loss, ours = _dualign(trainer, examples)
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert ours[name].item() == pytest.approx(metrics[name], abs=1e-5), name
    for name in ("rewards/chosen", "rewards/rejected"):  # the log-ratios themselves: rewards / beta
        assert ours[name].item() / BETA == pytest.approx(metrics[name] / BETA, abs=1e-5), name
    for name in ("logps/chosen", "logps/rejected"):  # TRL sums log-probs in float32 whatever the model's dtype
        assert ours[name].item() == pytest.approx(metrics[name], rel=2e-7), name
    assert abs(metrics["rewards/chosen"]) > 1e-3  # the log-ratios are not trivially zero
