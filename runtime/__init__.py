"""qwen2rt: a lean single-GPU inference runtime for the Qwen2 model family.

    from qwen2rt import LLM, SamplingParams
    llm = LLM("tiny")                      # or a Hugging Face checkpoint folder
    print(llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0))[0].text)
"""

from .llm import LLM, CompletionOutput, RequestOutput
from .sampling import SamplingParams
from .structured import StructuredOutputs

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "StructuredOutputs", "__version__"]
