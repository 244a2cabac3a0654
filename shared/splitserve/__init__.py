"""splitserve: disaggregated LLM inference.

`from splitserve import LLM, SamplingParams` is the offline API; the services run the same engine.
"""

from splitserve.sampling_params import InvalidRequestError, SamplingParams, StructuredOutput

__all__ = ["LLM", "SamplingParams", "StructuredOutput", "InvalidRequestError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # LLM pulls in torch and transformers; the gateway and clients import this package without paying for that.
    if name == "LLM":
        from splitserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'splitserve' has no attribute {name!r}")
