// Emulator shim (tests/cuda_emu/emu.h) for <cuda_runtime_api.h>.
#pragma once
#include "../emu.h"
