"""internvl-batch: caption image datasets with InternVL on vLLM, at GPU speed, resumably."""
__version__ = "0.1.0"
