from emalib.model.losses import IGNORE_INDEX
from emalib.model.tokenize import ChatDataset, collate, tokenize_conversation

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": "Six, of course."},
]


def labelled_text(tokenizer, feature):
    ids = [t for t, label in zip(feature["input_ids"], feature["labels"]) if label != IGNORE_INDEX]
    return tokenizer.decode(ids)


def test_labels_cover_exactly_the_assistant_turns(tokenizer):
    feature = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    assert len(feature["input_ids"]) == len(feature["labels"])
    text = labelled_text(tokenizer, feature)
    # Each assistant turn and its end-of-turn marker are trained on; nothing of the system or user turns is.
    assert text.replace("<|im_end|>", "|").replace("\n", "") == "Four.|Six, of course.|"
    full = tokenizer.decode(feature["input_ids"])
    assert "What is two plus two?" in full and "Be brief." in full


def test_responses_only_off_labels_everything(tokenizer):
    feature = tokenize_conversation(tokenizer, CONVERSATION, max_length=512, responses_only=False)
    assert feature["labels"] == feature["input_ids"]


def test_truncation_and_dropping_examples_without_response(tokenizer):
    short = tokenize_conversation(tokenizer, CONVERSATION, max_length=10)
    assert len(short["input_ids"]) == 10 and all(label == IGNORE_INDEX for label in short["labels"])
    dataset = ChatDataset.build(tokenizer, [CONVERSATION, CONVERSATION[:3]], max_length=40)
    assert len(dataset) == 2
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    assert len(ChatDataset.build(tokenizer, [long_prompt, CONVERSATION], max_length=64)) == 1


def test_collate_pads_and_masks(tokenizer):
    a = tokenize_conversation(tokenizer, CONVERSATION, max_length=512)
    b = tokenize_conversation(tokenizer, CONVERSATION[1:3], max_length=512)
    batch = collate([a, b], pad_token_id=tokenizer.pad_token_id)
    width = len(a["input_ids"])
    assert batch["input_ids"].shape == (2, width)
    assert batch["attention_mask"][1].sum() == len(b["input_ids"])
    assert (batch["labels"][1, len(b["input_ids"]):] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, len(b["input_ids"]):] == tokenizer.pad_token_id).all()
