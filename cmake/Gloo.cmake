# torch_asgd's own Gloo: one pinned source, built statically with hidden visibility and
# linked into libtorch_asgd.so alone, so that no call of torch_asgd's can reach another
# Gloo (LibTorch's libtorch_cpu.so carries one, of another version and C++ ABI) and no
# other library can reach this one. Defines the target torch_asgd_gloo (internal).
#
#   TORCH_ASGD_GLOO_SOURCE  where the source is: a directory, or a .tar.xz/.tar.gz of
#                           pytorch/gloo at TORCH_ASGD_GLOO_COMMIT. Empty (the default):
#                           fetched with git from GitHub at configure time.
#                           scripts/build.sh passes ../shared/third_party's tarball when
#                           it is there.
#   TORCH_ASGD_GLOO_SHA256  the SHA-256 a tarball must have (default: the pinned tarball's,
#                           `git archive` of that commit compressed with xz); empty: not checked.
#   FETCHCONTENT_SOURCE_DIR_GLOO, FETCHCONTENT_FULLY_DISCONNECTED: CMake's own overrides work too.
include(FetchContent)

set(TORCH_ASGD_GLOO_COMMIT 3135b0b41b67dde590eef0938a0bf3d6238df5f7)
set(TORCH_ASGD_GLOO_SOURCE "" CACHE STRING
  "Gloo's source for torch_asgd's private build: a directory or a tarball of pytorch/gloo at ${TORCH_ASGD_GLOO_COMMIT} (empty: git clone from GitHub)")
set(TORCH_ASGD_GLOO_SHA256 9ff2f1f032717688f13747b1549129d6699715a409ddb904ee5f0c31da8536ab CACHE STRING
  "SHA-256 of the Gloo tarball given in TORCH_ASGD_GLOO_SOURCE (empty: not checked)")

if(TORCH_ASGD_GLOO_SOURCE)
  get_filename_component(_gloo_src "${TORCH_ASGD_GLOO_SOURCE}" ABSOLUTE)
  if(IS_DIRECTORY "${_gloo_src}")
    if(NOT EXISTS "${_gloo_src}/gloo/context.h")
      message(FATAL_ERROR "TORCH_ASGD_GLOO_SOURCE=${_gloo_src} is a directory without gloo/context.h: point it at Gloo's source tree (pytorch/gloo at ${TORCH_ASGD_GLOO_COMMIT}) or at a tarball of it")
    endif()
    FetchContent_Declare(gloo SOURCE_DIR "${_gloo_src}")
    set(_gloo_from "${_gloo_src} (a directory)")
  elseif(EXISTS "${_gloo_src}")
    set(_hash)
    if(TORCH_ASGD_GLOO_SHA256)
      file(SHA256 "${_gloo_src}" _actual)
      if(NOT _actual STREQUAL TORCH_ASGD_GLOO_SHA256)
        message(FATAL_ERROR "TORCH_ASGD_GLOO_SOURCE=${_gloo_src} has SHA-256 ${_actual}, not the pinned tarball's ${TORCH_ASGD_GLOO_SHA256}. Use the pinned source (pytorch/gloo at ${TORCH_ASGD_GLOO_COMMIT}), or, to build another Gloo on purpose, pass -DTORCH_ASGD_GLOO_SHA256=<its hash> (or empty)")
      endif()
    endif()
    FetchContent_Declare(gloo URL "${_gloo_src}" DOWNLOAD_EXTRACT_TIMESTAMP TRUE)
    set(_gloo_from "${_gloo_src}")
  else()
    message(FATAL_ERROR "TORCH_ASGD_GLOO_SOURCE=${TORCH_ASGD_GLOO_SOURCE} does not exist: give a directory or tarball of Gloo's source, or leave it empty to fetch pytorch/gloo ${TORCH_ASGD_GLOO_COMMIT} with git")
  endif()
else()
  FetchContent_Declare(gloo
    GIT_REPOSITORY https://github.com/pytorch/gloo.git
    GIT_TAG ${TORCH_ASGD_GLOO_COMMIT})
  set(_gloo_from "https://github.com/pytorch/gloo.git at ${TORCH_ASGD_GLOO_COMMIT} (without network: -DTORCH_ASGD_GLOO_SOURCE=<a tarball or directory of it>)")
endif()

FetchContent_GetProperties(gloo)
if(NOT gloo_POPULATED)
  message(STATUS "torch_asgd: Gloo from ${_gloo_from}")
  FetchContent_Populate(gloo)
endif()

# Gloo's own CMake, configured as LibTorch's build configures it for CPU (TCP transport,
# no CUDA, no libuv, no Redis, no MPI), but static and with hidden symbols. In a
# function, so that these settings stay in Gloo's scope.
function(torch_asgd_add_gloo)
  set(GLOO_STATIC_OR_SHARED STATIC CACHE STRING "" FORCE)
  set(GLOO_INSTALL OFF CACHE BOOL "" FORCE)
  foreach(opt BUILD_TEST BUILD_BENCHMARK USE_REDIS USE_IBVERBS USE_NCCL USE_RCCL USE_LIBUV
      USE_TCP_OPENSSL_LINK USE_TCP_OPENSSL_LOAD USE_CUDA USE_ROCM USE_MPI)
    set(${opt} OFF CACHE BOOL "" FORCE)
  endforeach()
  set(BUILD_SHARED_LIBS OFF)
  set(CMAKE_POSITION_INDEPENDENT_CODE ON)
  if(TORCH_ASGD_GLOO_ISOLATION)
    set(CMAKE_CXX_VISIBILITY_PRESET hidden)
    set(CMAKE_C_VISIBILITY_PRESET hidden)
    set(CMAKE_VISIBILITY_INLINES_HIDDEN ON)
    set(CMAKE_POLICY_DEFAULT_CMP0063 NEW)  # visibility presets for static libraries too
  endif()
  add_subdirectory(${gloo_SOURCE_DIR} ${gloo_BINARY_DIR} EXCLUDE_FROM_ALL)
endfunction()
torch_asgd_add_gloo()
# Gloo's warnings are Gloo's.
target_compile_options(gloo PRIVATE -w)

add_library(torch_asgd_gloo INTERFACE)
target_link_libraries(torch_asgd_gloo INTERFACE gloo)
target_include_directories(torch_asgd_gloo SYSTEM INTERFACE ${gloo_SOURCE_DIR} ${gloo_BINARY_DIR})
