// Precompiled once and shared by every target (see CMakeLists.txt): the LibTorch
// headers dominate compile time, about 20 s per translation unit without this.
#pragma once
#include <torch/torch.h>
