"""Rollout side: the engine config, the vLLM engine wrapper, engine weight formats, the one reload path and the
weight-sync hook (the quantizer references live in ``flash_rc.algo.quant``)."""
