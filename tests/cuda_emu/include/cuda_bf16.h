// Emulator shim (tests/cuda_emu/emu.h) for <cuda_bf16.h>.
#pragma once
#include "../emu.h"
