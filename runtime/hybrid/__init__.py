"""Hybrid CPU+GPU placement: the GPU runs the pass, the CPU computes the layers the plan gives it.

    rates.py    the machine's measured rates (link, GPU read, CPU per type and batch), cached
    plan.py     which steps the CPU takes, per pass size, from the rates and the budgets
    kv.py       a layer's KV cache on whichever side computes it
    backend.py  runtime/backend.py's contract over the Vulkan and native CPU backends
"""
