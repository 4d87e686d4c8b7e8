# lossd_grpc_library(<target> PROTO <file.proto> ROOT <dir> GEN <dir> [IMPORTS <dir>...]
#                    LINK <libs>...)
# Runs protoc with the gRPC C++ plugin on PROTO (its path below ROOT names the generated files
# under GEN, e.g. ROOT/lossd/v1/lossd.proto -> GEN/lossd/v1/lossd.pb.{h,cc} and
# .grpc.pb.{h,cc}) and builds them as the static library <target>, which exports GEN as an
# include directory and links LINK publicly. IMPORTS are further --proto_path roots.
function(lossd_grpc_library target)
  cmake_parse_arguments(ARG "" "PROTO;ROOT;GEN" "IMPORTS;LINK" ${ARGN})
  file(RELATIVE_PATH rel ${ARG_ROOT} ${ARG_PROTO})
  string(REGEX REPLACE "\\.proto$" "" stem ${rel})
  set(srcs ${ARG_GEN}/${stem}.pb.cc ${ARG_GEN}/${stem}.grpc.pb.cc)
  set(proto_paths)
  foreach(dir IN LISTS ARG_ROOT ARG_IMPORTS)
    list(APPEND proto_paths --proto_path=${dir})
  endforeach()
  file(MAKE_DIRECTORY ${ARG_GEN})
  add_custom_command(
    OUTPUT ${srcs} ${ARG_GEN}/${stem}.pb.h ${ARG_GEN}/${stem}.grpc.pb.h
    COMMAND protobuf::protoc ${proto_paths} --cpp_out=${ARG_GEN} --grpc_out=${ARG_GEN}
      --plugin=protoc-gen-grpc=$<TARGET_FILE:gRPC::grpc_cpp_plugin> ${ARG_PROTO}
    DEPENDS ${ARG_PROTO} protobuf::protoc gRPC::grpc_cpp_plugin
    COMMENT "Generating C++ from ${rel}")
  add_library(${target} STATIC ${srcs})
  target_include_directories(${target} PUBLIC ${ARG_GEN})
  target_link_libraries(${target} PUBLIC ${ARG_LINK})
endfunction()
