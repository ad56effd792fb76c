"""The lab's word-level tokenizer, trained with the ``tokenizers`` library on the generated corpus.

With ``name_style="single_token"`` each full name is one added token (the lab's default); pretrained models bring
their own tokenizers and never use this one.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast

from mechrecall.lab.bios import FactDataset

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def train_tokenizer(dataset: FactDataset, name_style: str = "single_token") -> PreTrainedTokenizerFast:
    """Word-level tokenizer trained on every text the dataset can render; prepends ``<bos>``."""
    tok = Tokenizer(WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(dataset.corpus(), trainer=WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS)))
    if name_style == "single_token":
        tok.add_tokens([AddedToken(p.name, single_word=True, normalized=False) for p in dataset.people])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
