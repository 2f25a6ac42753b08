"""Bridges to other multi-task libraries. Each submodule imports without its library; using
it then says what to install.

    from cs_kernels.integrations.torchjd import ConnectionStrengthAggregator
"""
