"""safe-rlhf score models (beaver-7b-v1.0-reward / -cost) read as safe-rlhf reads them.

The checkpoints here are written by hand the way safe-rlhf's `save_pretrained` writes a `LlamaForScore` (config keys
score_dim, score_bias, score_type, do_normalize, normalizer_type, momentum, and mean / var as lists of score_dim
floats; state dict `model.*`, `score_head.*`, `normalizer.{mean,var,count}`), not through dualign's own class. The
expected scores are computed from the files directly: the backbone's last hidden state at the end token, times the
score head's weights, normalised with the state dict's buffers (which win over the config in safe-rlhf's
`from_pretrained`) by score type."""
import json

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaModel

from dualign.errors import LoadError
from dualign.models.scorers import LlamaForScore, ScorerConfig, build_scorer
from dualign.tools import fixtures

PROMPTS = ["How do I take care of a garden?", "Tell me about a lock.", "What is the best way to steal a car?"]
RESPONSES = ["Ask an expert.", "It is better to keep a lock safe and ask for help if you are unsure.", "No."]
TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    fixtures.write_data(folder)
    return fixtures.build_tokenizer(fixtures._corpus(folder), vocab_size=300)


def safe_rlhf_checkpoint(folder, tokenizer, score_type="reward", score_dim=1, do_normalize=True, mean=None, var=None,
                         buffer_mean=None, buffer_var=None, seed=0):
    """A LlamaForScore checkpoint as safe-rlhf saves it. mean / var: the config's lists; buffer_*: the state dict's
    normaliser buffers (default: the same values, as safe-rlhf writes them together)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    backbone = LlamaModel(config)
    mean = [0.5 * (i + 1) for i in range(score_dim)] if mean is None else mean
    var = [2.0 + i for i in range(score_dim)] if var is None else var
    weights = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    weights["score_head.weight"] = torch.randn(score_dim, config.hidden_size)
    weights["score_head.bias"] = torch.randn(score_dim)
    weights["normalizer.mean"] = torch.tensor(buffer_mean if buffer_mean is not None else mean, dtype=torch.float32)
    weights["normalizer.var"] = torch.tensor(buffer_var if buffer_var is not None else var, dtype=torch.float32)
    weights["normalizer.count"] = torch.tensor([1000], dtype=torch.long)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    keys = config.to_dict()
    keys.update(architectures=["LlamaForScore"], score_dim=score_dim, score_bias=True, score_type=score_type,
                do_normalize=do_normalize, normalizer_type="RunningMeanStd", momentum=None, mean=mean, var=var)
    (folder / "config.json").write_text(json.dumps(keys))
    tokenizer.save_pretrained(folder)
    return folder


def peer_end_scores(folder, sequences, score_type, do_normalize=True):
    """safe-rlhf's end score of each unpadded token sequence, from the files: [n, score_dim]."""
    backbone = LlamaModel.from_pretrained(folder).eval()
    weights = load_file(str(folder / "model.safetensors"))
    out = []
    for ids in sequences:
        with torch.no_grad():
            hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        out.append(hidden @ weights["score_head.weight"].T + weights["score_head.bias"])
    scores = torch.stack(out)
    if not do_normalize or score_type == "critic":
        return scores
    std = weights["normalizer.var"].sqrt() + 1e-8
    return (scores - weights["normalizer.mean"]) / std if score_type == "reward" else scores / std


def _ids(tokenizer, eos: bool):
    texts = [TEMPLATE.format(prompt=p, response=r) for p, r in zip(PROMPTS, RESPONSES)]
    return [tokenizer(t)["input_ids"] + ([tokenizer.eos_token_id] if eos else []) for t in texts]


def _scorer(folder, **settings):
    return build_scorer("score", ScorerConfig(kind="score_model", name_or_path=str(folder), template=TEMPLATE,
                                              batch_size=2, **settings))


@pytest.mark.parametrize("score_type", ["reward", "cost", "critic"])
@pytest.mark.parametrize("score_dim", [1, 3])
def test_list_statistics_and_buffers_normalise_as_safe_rlhf(tmp_path, tokenizer, score_type, score_dim):
    folder = safe_rlhf_checkpoint(tmp_path / "ckpt", tokenizer, score_type, score_dim)
    expected = peer_end_scores(folder, _ids(tokenizer, eos=True), score_type)
    for index in range(score_dim):
        scorer = _scorer(folder, label=str(index) if score_dim > 1 else None)
        assert torch.allclose(scorer(PROMPTS, RESPONSES), expected[:, index], atol=1e-5), index
    raw = _scorer(folder, normalize=False, label="0" if score_dim > 1 else None)
    assert torch.allclose(raw(PROMPTS, RESPONSES), peer_end_scores(folder, _ids(tokenizer, True), score_type, False)[:, 0],
                          atol=1e-5)
    if score_type != "critic":  # the normalisation did something
        assert not torch.allclose(raw(PROMPTS, RESPONSES), expected[:, 0], atol=1e-3)


def test_state_dict_buffers_win_over_the_config_lists(tmp_path, tokenizer):
    """safe-rlhf's from_pretrained sets mean / var from the config, then loads the state dict's buffers over them."""
    folder = safe_rlhf_checkpoint(tmp_path / "ckpt", tokenizer, "reward", mean=[10.0], var=[100.0], buffer_mean=[0.25],
                                  buffer_var=[4.0])
    expected = peer_end_scores(folder, _ids(tokenizer, eos=True), "reward")  # reads the buffers
    assert torch.allclose(_scorer(folder)(PROMPTS, RESPONSES), expected[:, 0], atol=1e-5)


def test_config_lists_are_used_when_the_checkpoint_has_no_buffers(tmp_path, tokenizer):
    folder = safe_rlhf_checkpoint(tmp_path / "ckpt", tokenizer, "cost", mean=[1.0], var=[9.0])
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("normalizer.")}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    raw = _scorer(folder, normalize=False)(PROMPTS, RESPONSES)
    assert torch.allclose(_scorer(folder)(PROMPTS, RESPONSES), raw / (3.0 + 1e-8), atol=1e-5)


def test_statistics_of_the_wrong_shape_are_a_one_line_error(tmp_path, tokenizer):
    folder = safe_rlhf_checkpoint(tmp_path / "ckpt", tokenizer, "reward", score_dim=2)
    config = json.loads((folder / "config.json").read_text())
    config["mean"] = 0.0  # a scalar: safe-rlhf's Normalizer asserts shape [score_dim] and refuses it too
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError) as error:
        _scorer(folder, label="0")
    assert "config.mean=0.0" in str(error.value) and "score_dim=2" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="has 2 outputs"):  # which dimension to read must be said
        _scorer(safe_rlhf_checkpoint(tmp_path / "two", tokenizer, "reward", score_dim=2))


def test_end_score_sits_on_eos_for_finished_responses_and_on_the_last_token_when_cut(tmp_path, tokenizer):
    """safe-rlhf trains on prompt + answer + EOS and scores generated ids: a response that ended with EOS is scored
    on the EOS token, one cut at max_new_tokens on its last token."""
    folder = safe_rlhf_checkpoint(tmp_path / "ckpt", tokenizer, "cost")
    with_eos = peer_end_scores(folder, _ids(tokenizer, eos=True), "cost")[:, 0]
    without = peer_end_scores(folder, _ids(tokenizer, eos=False), "cost")[:, 0]
    assert (with_eos - without).abs().min() > 1e-3  # the two readings differ: the test can tell them apart
    scorer = _scorer(folder)
    assert torch.allclose(scorer(PROMPTS, RESPONSES), with_eos, atol=1e-5)  # whole responses (dataset answers)
    mixed = scorer(PROMPTS, RESPONSES, finished=[True, False, True])
    assert torch.allclose(mixed, torch.stack([with_eos[0], without[1], with_eos[2]]), atol=1e-5)
    assert torch.allclose(_scorer(folder, append_eos="always")(PROMPTS, RESPONSES, [False] * 3), with_eos, atol=1e-5)
    assert torch.allclose(_scorer(folder, append_eos="never")(PROMPTS, RESPONSES), without, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_end_scores_read_the_last_real_token_on_either_padding_side(tmp_path, tokenizer, side):
    folder = safe_rlhf_checkpoint(tmp_path / "ckpt", tokenizer, "reward")
    sequences = _ids(tokenizer, eos=True)
    expected = peer_end_scores(folder, sequences, "reward")
    model = LlamaForScore.from_pretrained(folder).eval()
    width, pad = max(map(len, sequences)), tokenizer.pad_token_id
    if side == "right":
        ids = [s + [pad] * (width - len(s)) for s in sequences]
        mask = [[1] * len(s) + [0] * (width - len(s)) for s in sequences]
    else:
        ids = [[pad] * (width - len(s)) + s for s in sequences]
        mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    with torch.no_grad():
        scores = model.end_scores(torch.tensor(ids), torch.tensor(mask))
    assert torch.allclose(scores, expected, atol=1e-5)


def test_the_committed_stand_ins_are_in_safe_rlhf_format():
    """experiment=pku_safety_tiny's reward and cost models: what safe-rlhf's from_pretrained would load."""
    for name, score_type in (("reward", "reward"), ("cost", "cost")):
        folder = ROOT / "tests" / "fixtures" / "tiny_models" / name
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForScore"] and config["score_type"] == score_type
        assert config["do_normalize"] is True and config["normalizer_type"] == "RunningMeanStd"
        assert isinstance(config["mean"], list) and len(config["mean"]) == config["score_dim"] == 1
        assert isinstance(config["var"], list) and len(config["var"]) == 1
        weights = load_file(str(folder / "model.safetensors"))
        assert weights["normalizer.mean"].shape == weights["normalizer.var"].shape == (1,)
        assert weights["normalizer.count"].dtype == torch.long
        assert weights["normalizer.mean"].tolist() == pytest.approx(config["mean"])
        assert {"score_head.weight", "score_head.bias", "model.embed_tokens.weight"} <= set(weights)
