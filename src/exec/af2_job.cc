// Loading the whole AlphaFold2 model and its features from files (foldcube/alphafold.h): what the
// CLI's `run --model af2` and the Python package share.
#include "foldcube/alphafold.h"
#include "foldcube/io.h"

namespace fc {

Status load_alphafold(const std::string& path, AlphaFold* out) {
  TensorFile w;
  FC_RETURN_IF_ERROR(read_weights(path, &w));  // safetensors or AlphaFold .npz
  AlphaFoldConfig cfg;
  FC_RETURN_IF_ERROR(alphafold_config_from_weights(w, &cfg).WithContext(path));
  return AlphaFold::load(cfg, w, out).WithContext(path);
}

Status read_feature_file(const std::string& path, FeatureDict* out) {
  TensorFile f;
  FC_RETURN_IF_ERROR(read_safetensors(path, &f));
  out->clear();
  for (const std::string& n : f.names)
    if (n.rfind("feature.", 0) == 0) (*out)[n.substr(8)] = f.tensors.at(n);
  if (out->empty())
    return Status::InvalidArgument(path + ": no feature.<name> tensors in the file");
  return Status::OK();
}

}  // namespace fc
