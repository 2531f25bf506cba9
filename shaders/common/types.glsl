// Weight type codes: the GGML type ids (gguf GGMLQuantizationType), so a define reads as the file says.
#define T_F32  0
#define T_F16  1
#define T_Q4_0 2
#define T_Q4_1 3
#define T_Q8_0 8
#define T_Q4_K 12
#define T_Q6_K 14
#define T_BF16 30
