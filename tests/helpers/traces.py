"""Real request traces for tests (the shared data folder beside the checkout)."""

from pathlib import Path

AZURE_CONV = Path("/work/shared/data/traces/AzureLLMInferenceTrace_conv_2023.csv")
# measured GPU latencies the planner's roofline prior is calibrated on (placement/calibrate.py)
SPLITWISE = Path("/work/shared/data/profiles/splitwise_perf_model.csv")
