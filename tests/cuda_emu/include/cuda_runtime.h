// Emulator shim (tests/cuda_emu/emu.h) for <cuda_runtime.h>.
#pragma once
#include "../emu.h"
