"""Hugging Face pieces the interop tests build offline (no download): a fast tokenizer trained
here, as a downloaded model's tokenizer would be, with nothing of forge_dist in it."""


def hf_bpe_tokenizer(text: str, vocab_size: int = 320):
    """A transformers PreTrainedTokenizerFast: tokenizers' byte-level BPE trained on ``text``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
