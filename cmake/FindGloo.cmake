# FindGloo
# --------
# Finds Gloo's headers and library and defines the imported target Gloo::gloo.
#
#   Gloo_INCLUDE_DIR  where gloo/context.h lives (cache; set it to use other headers)
#   Gloo_LIBRARY      libgloo (cache). Leave it empty with TORCH_ASGD_GLOO_FROM_TORCH=ON
#                     when the Gloo symbols come from LibTorch itself (libtorch_cpu.so), so
#                     that exactly one Gloo build ends up in the process.
include(FindPackageHandleStandardArgs)

find_path(Gloo_INCLUDE_DIR NAMES gloo/context.h)
if(NOT TORCH_ASGD_GLOO_FROM_TORCH)
  find_library(Gloo_LIBRARY NAMES gloo)
  find_package_handle_standard_args(Gloo REQUIRED_VARS Gloo_LIBRARY Gloo_INCLUDE_DIR)
else()
  find_package_handle_standard_args(Gloo REQUIRED_VARS Gloo_INCLUDE_DIR)
endif()

if(Gloo_FOUND AND NOT TARGET Gloo::gloo)
  if(Gloo_LIBRARY)
    add_library(Gloo::gloo UNKNOWN IMPORTED)
    set_target_properties(Gloo::gloo PROPERTIES IMPORTED_LOCATION "${Gloo_LIBRARY}")
  else()
    add_library(Gloo::gloo INTERFACE IMPORTED)
  endif()
  set_target_properties(Gloo::gloo PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${Gloo_INCLUDE_DIR}")
endif()
mark_as_advanced(Gloo_INCLUDE_DIR Gloo_LIBRARY)
