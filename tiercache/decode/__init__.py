"""The decode step: the block table, and the pipeline that turns a layer's query into its
attention output (write, plan, select, resident, attend)."""
