"""Facts of OpenAI's o200k_harmony vocabulary that the code relies on, written once.

`data.tokenizer` checks them against tiktoken's encoding when it loads it.
"""

ENCODING_NAME = "o200k_harmony"
VOCAB_SIZE = 201088  # n_vocab, padded by OpenAI to a multiple of 64 with reserved tokens

# Special tokens by name: text markers and the harmony chat format's structure.
STARTOFTEXT = "<|startoftext|>"
ENDOFTEXT = "<|endoftext|>"
START = "<|start|>"
END = "<|end|>"
MESSAGE = "<|message|>"
CHANNEL = "<|channel|>"
CONSTRAIN = "<|constrain|>"
RETURN = "<|return|>"
CALL = "<|call|>"

# The words harmony writes between its special tokens in a message header (roles, then channels),
# as in `<|start|>assistant<|channel|>final<|message|>`. They are ordinary text to the encoding,
# so a compact vocabulary keeps them beside the specials: else a model must spell them in bytes.
HARMONY_ROLES = ("system", "developer", "user", "assistant")
HARMONY_CHANNELS = ("analysis", "commentary", "final")

SPECIAL_IDS = {
    STARTOFTEXT: 199998, ENDOFTEXT: 199999, RETURN: 200002, CONSTRAIN: 200003,
    CHANNEL: 200005, START: 200006, END: 200007, MESSAGE: 200008, CALL: 200012,
}
