"""The memory layer: where each block's bytes live (device slots, host rows, disk and remote
records), and the tensor tables that say which device slot holds which block."""
