// Only for compiling torch_asgd's CUDA glue against Debian's CPU LibTorch, whose
// c10/cuda headers lack this generated file (a CUDA LibTorch ships its own). Nothing
// compiled with it is linked.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
