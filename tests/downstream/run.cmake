# Installs the build into a scratch prefix, then configures, builds and runs
# tests/downstream against it with find_package(torch_asgd).
set(work "${BUILD_DIR}/downstream-test")
file(REMOVE_RECURSE "${work}")
foreach(step
    "${CMAKE_COMMAND};--install;${BUILD_DIR};--prefix;${work}/prefix"
    "${CMAKE_COMMAND};-S;${SOURCE_DIR}/tests/downstream;-B;${work}/build;-DCMAKE_PREFIX_PATH=${work}/prefix;-DCMAKE_BUILD_TYPE=Release"
    "${CMAKE_COMMAND};--build;${work}/build"
    "${work}/build/downstream")
  execute_process(COMMAND ${step} RESULT_VARIABLE rv)
  if(NOT rv EQUAL 0)
    message(FATAL_ERROR "downstream step failed (${rv}): ${step}")
  endif()
endforeach()
