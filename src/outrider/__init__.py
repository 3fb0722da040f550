"""outrider: lossless speculative decoding for any Hugging Face causal LM."""

from outrider.batch import BatchDecoder
from outrider.decoder import Chunk, GenerationRequest, GenerationResult, SpeculativeDecoder
from outrider.drafters import REGISTRY as DRAFTERS
from outrider.sampling import SamplingParams
from outrider.stats import SpecStats

__all__ = ["DRAFTERS", "BatchDecoder", "Chunk", "GenerationRequest", "GenerationResult", "SamplingParams",
           "SpecStats", "SpeculativeDecoder"]
__version__ = "0.1.0"
