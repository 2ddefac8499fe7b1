/* Loads a SavedModel through TensorFlow's C API (TF_LoadSessionFromSavedModel, the
 * C++ loader TensorFlow Serving is built on) and runs one float32 batch through it:
 * no Python in the process.
 *
 *   serve_savedmodel DIR INPUT:INDEX ROWS COLS IN.bin OUTPUT:INDEX OUT.bin
 *
 * IN.bin holds ROWS x COLS float32 values; OUT.bin receives the output tensor's
 * bytes. Exit status 2 with "LOAD FAILED: <message>" on stderr if the model does
 * not load (e.g. an op the runtime does not have), 3 if it does not run.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensorflow/c/c_api.h"

static TF_Output find(TF_Graph* graph, const char* spec) {
  char name[1024];
  const char* colon = strrchr(spec, ':');
  size_t len = colon ? (size_t)(colon - spec) : strlen(spec);
  if (len >= sizeof(name)) len = sizeof(name) - 1;
  memcpy(name, spec, len);
  name[len] = '\0';
  TF_Output out = {TF_GraphOperationByName(graph, name), colon ? atoi(colon + 1) : 0};
  if (out.oper == NULL) {
    fprintf(stderr, "NO OPERATION %s\n", name);
    exit(4);
  }
  return out;
}

static void no_free(void* data, size_t len, void* arg) { (void)data; (void)len; (void)arg; }

int main(int argc, char** argv) {
  if (argc != 8) {
    fprintf(stderr, "usage: %s DIR INPUT:INDEX ROWS COLS IN.bin OUTPUT:INDEX OUT.bin\n", argv[0]);
    return 1;
  }
  TF_Status* status = TF_NewStatus();
  TF_Graph* graph = TF_NewGraph();
  TF_SessionOptions* options = TF_NewSessionOptions();
  const char* tags[] = {"serve"};
  TF_Session* session =
      TF_LoadSessionFromSavedModel(options, NULL, argv[1], tags, 1, graph, NULL, status);
  if (TF_GetCode(status) != TF_OK) {
    fprintf(stderr, "LOAD FAILED: %s\n", TF_Message(status));
    return 2;
  }
  int64_t dims[2] = {atoll(argv[3]), atoll(argv[4])};
  size_t bytes = (size_t)(dims[0] * dims[1]) * sizeof(float);
  float* values = malloc(bytes);
  FILE* in = fopen(argv[5], "rb");
  if (in == NULL || fread(values, 1, bytes, in) != bytes) {
    fprintf(stderr, "CANNOT READ %s\n", argv[5]);
    return 1;
  }
  fclose(in);
  TF_Tensor* input = TF_NewTensor(TF_FLOAT, dims, 2, values, bytes, no_free, NULL);
  TF_Output input_op = find(graph, argv[2]);
  TF_Output output_op = find(graph, argv[6]);
  TF_Tensor* output = NULL;
  TF_SessionRun(session, NULL, &input_op, &input, 1, &output_op, &output, 1, NULL, 0, NULL,
                status);
  if (TF_GetCode(status) != TF_OK) {
    fprintf(stderr, "RUN FAILED: %s\n", TF_Message(status));
    return 3;
  }
  FILE* out = fopen(argv[7], "wb");
  fwrite(TF_TensorData(output), 1, TF_TensorByteSize(output), out);
  fclose(out);
  TF_DeleteTensor(input);
  TF_DeleteTensor(output);
  TF_CloseSession(session, status);
  TF_DeleteSession(session, status);
  TF_DeleteGraph(graph);
  TF_DeleteSessionOptions(options);
  TF_DeleteStatus(status);
  free(values);
  printf("OK\n");
  return 0;
}
