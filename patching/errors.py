"""One error type for bad node input, so every message names the node and the input and says what to do."""


class NodeInputError(ValueError):
    def __init__(self, node: str, input_name: str, message: str):
        self.node, self.input_name = node, input_name
        super().__init__(f"[Faithful Inpaint] {node}, input '{input_name}': {message}")
