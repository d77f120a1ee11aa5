"""dualign's DPO loss and chosen/rejected log-ratios equal TRL DPOTrainer's on the same tiny model and batch (hard
labels). TRL is a test-only dependency; it tokenizes the text, and dualign is fed TRL's own token ids.

Tolerances: dualign computes in the models' dtype (float64 here); TRL casts the logits to float32 in its chunked
log-prob kernel and sums the per-token log-probs in float32, whatever the model's dtype. So TRL's sequence log-prob
carries float32 rounding relative to its magnitude, and the bound is set from that: |error| <= 4 eps32 |log p| for each
summed log-prob (observed: about 0.3 eps32 |log p|, differing by CPU), propagated through the differences, the beta
factor and the loss (whose derivative in the margin is at most beta)."""
import copy
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")

from conftest import ROOT  # noqa: E402
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from dualign.models.rollout import Rollouts  # noqa: E402
from dualign.training.data import sequence_logprobs, tokenized  # noqa: E402
from dualign.training.policy_steps import DPOStep  # noqa: E402

PROMPTS = ["How do I fix a lock?", "Tell me a joke about cars please", "What is a safe way to store a knife?"]
CHOSEN = [" Call a locksmith.", " Why did the car stop? It was tired.", " In a block, blade down."]
REJECTED = [" Break it.", " No.", " Anywhere, who cares, just leave it on the table for the kids."]
BETA = 0.1
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def trainer():
    import datasets

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "tests" / "fixtures" / "tiny_models" / "policy")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # float64 models: dualign's side is exact to float64; TRL's float32 rounding is bounded in the test
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
        loss, metrics = DPOStep(BETA, labels="hard")(trainer.model, batch, torch.zeros(0), 0)
    # per-row float32 bound on a log-ratio log pi/pi_ref: rounding of both summed log-probs
    logps = sequence_logprobs(trainer.model, input_ids, attention_mask, response_mask).view(len(examples), 2)
    bound = 4 * EPS32 * (logps.abs() + batch["ref_logps"].abs())  # [rows, (rejected, chosen)]
    ratios = logps - batch["ref_logps"]
    return loss, metrics, logps, bound, ratios[:, 1] - ratios[:, 0]


@pytest.mark.parametrize("rows", [[0], [1], [2], [0, 1, 2]])
def test_loss_and_log_ratios_equal_trl(trainer, rows):
    examples = [trainer.train_dataset[i] for i in rows]
    trainer._metrics["eval"].clear()
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, trainer.data_collator(examples), return_outputs=False)
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    loss, ours, logps, bound, margins = _dualign(trainer, examples)
    rejected, chosen = bound[:, 0], bound[:, 1]
    ratio_bound = {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
                   "rewards/margins": (chosen + rejected).mean()}
    for name, tolerance in ratio_bound.items():  # rewards = beta * log-ratio; the log-ratios themselves: / beta
        assert ours[name].item() / BETA == pytest.approx(metrics[name] / BETA, abs=tolerance.item()), name
        assert abs(ours[name].item() - metrics[name]) <= BETA * tolerance.item(), name
    # d(-log sigmoid(beta m))/dm is at most beta: the loss is off by at most beta times the margin's bound
    assert abs(loss.item() - trl_loss.item()) <= BETA * (chosen + rejected).mean().item()
    if (margins.abs() > chosen + rejected).all():  # accuracies are exact unless a margin is within rounding of 0
        assert ours["rewards/accuracies"].item() == metrics["rewards/accuracies"]
    for name, column in (("logps/chosen", 1), ("logps/rejected", 0)):  # TRL's float32 sums of the same log-probs
        assert abs(ours[name].item() - metrics[name]) <= 4 * EPS32 * logps[:, column].abs().mean().item(), name
    assert abs(metrics["rewards/chosen"]) > 1e-3  # the log-ratios are not trivially zero
    # the bound is far below one token's log-prob (1 to 6 nats here): a formula error cannot hide in it
    print(f"\nrows {rows}: float32 bound on the log-ratios {bound.max().item():.2e}")
    assert bound.max().item() < 1e-2
