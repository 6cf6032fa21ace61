/* What mocod does with a checkpoint without running a daemon:
 *
 *   mocod --export-model CHECKPOINT PATH [--encoder query|key]      the encoder as safetensors
 *   mocod embed --checkpoint CHECKPOINT --data FILES --out OUT.npy [--features|--embeddings]
 *               [--labels FILE] [--encoder query|key] [--batch N] [--threads N] [--bad-record stop|skip]
 *               [--set PATH=VALUE]...
 *
 * CHECKPOINT is a checkpoint file or a checkpoint directory (its newest good file). The encoder is
 * rebuilt from the config the checkpoint carries (its CONF section) and its input record (NORM), so
 * neither the training data nor the config file is needed; --set changes that config as it does mocod's
 * (threads, say; the model keys must stay as trained, or the weights do not load). Each returns a process exit status (0 ok,
 * 1 failed, 2 usage) after printing what it did or why not. */
#ifndef MOCO_SERVICE_OFFLINE_H
#define MOCO_SERVICE_OFFLINE_H

int offline_export_model(const char *checkpoint, const char *path, const char *encoder, const char **sets, int n_sets);
int offline_embed(int argc, char **argv);

#endif
