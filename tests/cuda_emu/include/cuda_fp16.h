// Emulator shim (tests/cuda_emu/emu.h) for <cuda_fp16.h>.
#pragma once
#include "../emu.h"
