// Host emulation test of the CUDA kernels: see run.sh.
#include "emu.h"
#include <cstdio>
#include <random>
#include "k.inc"
std::mt19937 rng(1);
std::vector<float> rnd(size_t n){ std::uniform_real_distribution<float> d(-1,1); std::vector<float> v(n); for(auto&x:v)x=d(rng); return v; }
int fails=0;
void check(const char* what, const std::vector<float>& a, const std::vector<float>& b, double tol){
  double m=0, s=1e-12; for(size_t i=0;i<a.size();++i){ m=std::max(m,(double)fabs(a[i]-b[i])); s=std::max(s,(double)fabs(b[i])); }
  bool ok = a.size()==b.size() && m<=tol*s; if(!ok) fails++;
  printf("%-40s n=%zu maxdiff/scale=%.3g %s\n", what, a.size(), m/s, ok?"ok":"FAIL");
}
int outsz(int n,int k,int s,int p){ return (n+2*p-k)/s+1; }
void ref_fwd(const std::vector<float>& x, const std::vector<float>& w, const float* b, const float* a, float cap, bool hascap, std::vector<float>& y, DwShape s){
  y.assign((size_t)s.n*s.c*s.oh*s.ow,0);
  for(int i=0;i<s.n;i++)for(int c=0;c<s.c;c++)for(int oy=0;oy<s.oh;oy++)for(int ox=0;ox<s.ow;ox++){
    double acc=b?b[c]:0; for(int ky=0;ky<s.kh;ky++)for(int kx=0;kx<s.kw;kx++){int iy=oy*s.stride-s.ph+ky, ix=ox*s.stride-s.pw+kx; if(iy<0||iy>=s.h||ix<0||ix>=s.w)continue; acc+=w[(c*s.kh+ky)*s.kw+kx]*x[(((size_t)i*s.c+c)*s.h+iy)*s.w+ix];}
    if(a&&acc<0)acc*=a[c]; if(hascap)acc=std::min(acc,(double)cap);
    y[(((size_t)i*s.c+c)*s.oh+oy)*s.ow+ox]=acc;}
}
void test_dw(int n,int c,int h,int w,int kh,int kw,int st,int ph,int pw){
  DwShape s{n,c,h,w,outsz(h,kh,st,ph),outsz(w,kw,st,pw),kh,kw,st,ph,pw};
  auto x=rnd((size_t)n*c*h*w), wt=rnd((size_t)c*kh*kw), b=rnd(c), a=rnd(c), g=rnd((size_t)n*c*s.oh*s.ow);
  char name[128]; snprintf(name,128,"[%d,%d,%d,%d] k%dx%d s%d p%d,%d",n,c,h,w,kh,kw,st,ph,pw);
  // forward, plain and fused
  std::vector<float> y(g.size()), yr; ref_fwd(x,wt,nullptr,nullptr,0,false,yr,s);
  launch(3,32,[&]{ dw_forward_f32(x.data(),wt.data(),wt.data(),wt.data(),y.data(),s,0,0.f); });
  check((std::string("fwd ")+name).c_str(), y, yr, 1e-5);
  ref_fwd(x,wt,b.data(),a.data(),0.3f,true,yr,s);
  launch(2,64,[&]{ dw_forward_f32(x.data(),wt.data(),b.data(),a.data(),y.data(),s,7,0.3f); });
  check((std::string("fwd fused ")+name).c_str(), y, yr, 1e-5);
  // f16 / bf16 storage
  std::vector<f16> xh(x.size()), yh(y.size()); std::vector<bf16> xb(x.size()), yb(y.size());
  for(size_t i=0;i<x.size();i++){ xh[i]=from_f32<f16>(x[i]); xb[i]=from_f32<bf16>(x[i]); }
  launch(2,64,[&]{ dw_forward_f16(xh.data(),wt.data(),b.data(),a.data(),yh.data(),s,7,0.3f); });
  launch(2,64,[&]{ dw_forward_bf16(xb.data(),wt.data(),b.data(),a.data(),yb.data(),s,7,0.3f); });
  std::vector<float> yh32(y.size()), yb32(y.size()); for(size_t i=0;i<y.size();i++){ yh32[i]=to_f32(yh[i]); yb32[i]=to_f32(yb[i]); }
  check((std::string("fwd f16 ")+name).c_str(), yh32, yr, 3e-3);
  check((std::string("fwd bf16 ")+name).c_str(), yb32, yr, 3e-2);
  // gradients of sum(y * g) with y the plain conv
  std::vector<float> dxr(x.size(),0), dwr(wt.size(),0);
  for(int i=0;i<n;i++)for(int ch=0;ch<c;ch++)for(int oy=0;oy<s.oh;oy++)for(int ox=0;ox<s.ow;ox++)for(int ky=0;ky<kh;ky++)for(int kx=0;kx<kw;kx++){
    int iy=oy*st-ph+ky, ix=ox*st-pw+kx; if(iy<0||iy>=h||ix<0||ix>=w)continue;
    size_t xi=(((size_t)i*c+ch)*h+iy)*w+ix, gi=(((size_t)i*c+ch)*s.oh+oy)*s.ow+ox;
    dxr[xi]+=wt[(ch*kh+ky)*kw+kx]*g[gi]; dwr[(ch*kh+ky)*kw+kx]+=g[gi]*x[xi]; }
  std::vector<float> dx(x.size(),-7), dw(wt.size(),-7);
  launch(3,32,[&]{ dw_input_grad_f32(g.data(),wt.data(),dx.data(),s); });
  launch(c*kh*kw,REDUCE_THREADS,[&]{ dw_weight_grad_f32(g.data(),x.data(),dw.data(),s); });
  check((std::string("dx ")+name).c_str(), dx, dxr, 1e-5);
  check((std::string("dw ")+name).c_str(), dw, dwr, 1e-5);
}
void test_pointwise(int n,int c,int plane){
  size_t len=(size_t)n*c*plane; auto x=rnd(len), dy=rnd(len), b=rnd(c), a=rnd(c), gam=rnd(c), bet=rnd(c);
  for(auto& v: x) v = v*2+0.3f;
  char name[64]; snprintf(name,64,"[%d,%d,%d]",n,c,plane);
  // bias_prelu
  std::vector<float> y(len), yr(len);
  for(size_t i=0;i<len;i++){int ch=(i/plane)%c; float v=x[i]+b[ch]; if(v<0)v*=a[ch]; yr[i]=std::min(v,0.5f);}
  launch(2,32,[&]{ bias_prelu_f32(x.data(),b.data(),a.data(),y.data(),(i64)len,c,plane,7,0.5f); });
  check((std::string("bias_prelu ")+name).c_str(), y, yr, 1e-6);
  // prelu fwd / grads, cap 0.7
  float cap=0.7f;
  for(size_t i=0;i<len;i++){int ch=(i/plane)%c; float v=x[i]; yr[i]=std::min(std::max(v,0.f)+a[ch]*std::min(v,0.f),cap);}
  launch(2,32,[&]{ prelu_forward_f32(x.data(),a.data(),y.data(),(i64)len,c,plane,cap); });
  check((std::string("prelu fwd ")+name).c_str(), y, yr, 1e-6);
  std::vector<float> dxr(len), dx(len), dar(c,0), da(c);
  for(size_t i=0;i<len;i++){int ch=(i/plane)%c; float v=x[i]; dxr[i]= v>0 ? (v<cap?dy[i]:0) : a[ch]*dy[i]; if(v<0) dar[ch]+=dy[i]*v;}
  launch(2,32,[&]{ prelu_input_grad_f32(x.data(),dy.data(),a.data(),dx.data(),(i64)len,c,plane,cap); });
  launch(c,REDUCE_THREADS,[&]{ prelu_slope_grad_f32(x.data(),dy.data(),da.data(),n,c,plane); });
  check((std::string("prelu dx ")+name).c_str(), dx, dxr, 1e-6);
  check((std::string("prelu dslope ")+name).c_str(), da, dar, 1e-5);
  // batch norm forward
  double eps=1e-3; std::vector<double> mean(c,0), var(c,0); double m=(double)n*plane;
  for(size_t i=0;i<len;i++) mean[(i/plane)%c]+=x[i]; for(auto& v:mean) v/=m;
  for(size_t i=0;i<len;i++){int ch=(i/plane)%c; var[ch]+=(x[i]-mean[ch])*(x[i]-mean[ch]);} for(auto& v:var) v/=m;
  std::vector<float> stats(2*c), affine(2*c);
  launch(c,REDUCE_THREADS,[&]{ bn_stats_f32(x.data(),gam.data(),bet.data(),stats.data(),affine.data(),n,c,plane,eps,1); });
  std::vector<float> sr(2*c); for(int ch=0;ch<c;ch++){sr[ch]=mean[ch]; sr[c+ch]=var[ch];}
  check((std::string("bn stats ")+name).c_str(), stats, sr, 1e-6);
  for(size_t i=0;i<len;i++){int ch=(i/plane)%c; yr[i]=(x[i]-mean[ch])/sqrt(var[ch]+eps)*gam[ch]+bet[ch];}
  launch(2,32,[&]{ bn_apply_f32(x.data(),affine.data(),y.data(),(i64)len,c,plane); });
  check((std::string("bn fwd ")+name).c_str(), y, yr, 1e-5);
  // batch norm backward: y = gamma * xhat + beta, L = sum(y * dy)
  std::vector<double> db(c,0), dg(c,0);
  for(size_t i=0;i<len;i++){int ch=(i/plane)%c; double xh=(x[i]-mean[ch])/sqrt(var[ch]+eps); db[ch]+=dy[i]; dg[ch]+=dy[i]*xh;}
  std::vector<float> outr(len+2*c);
  for(size_t i=0;i<len;i++){int ch=(i/plane)%c; double inv=1/sqrt(var[ch]+eps), xh=(x[i]-mean[ch])*inv;
    outr[i]=gam[ch]*inv/m*(m*dy[i]-db[ch]-xh*dg[ch]);}
  for(int ch=0;ch<c;ch++){outr[len+ch]=dg[ch]; outr[len+c+ch]=db[ch];}
  std::vector<float> out(len+2*c,-9), coef(4*c);
  launch(c,REDUCE_THREADS,[&]{ bn_stats_f32(x.data(),gam.data(),bet.data(),stats.data(),affine.data(),n,c,plane,eps,0); });
  launch(c,REDUCE_THREADS,[&]{ bn_grad_sums_f32(x.data(),dy.data(),gam.data(),stats.data(),out.data(),coef.data(),n,c,plane,eps); });
  launch(3,32,[&]{ bn_grad_input_f32(x.data(),dy.data(),coef.data(),out.data(),(i64)len,c,plane); });
  check((std::string("bn grad ")+name).c_str(), out, outr, 1e-5);
}
int main(){
  test_dw(2,5,9,7,3,3,1,1,1);
  test_dw(2,6,7,9,3,3,2,1,1);
  test_dw(2,3,8,10,3,3,2,0,0);
  test_dw(3,4,7,7,7,7,1,0,0);
  test_dw(2,3,11,6,3,5,2,1,2);
  test_dw(3,2,1,1,3,3,1,1,1);
  test_dw(1,4,5,5,3,3,3,1,1);
  test_pointwise(3,4,25);
  test_pointwise(2,3,1);
  test_pointwise(5,2,300);
  printf("%s\n", fails? "FAILURES":"all ok");
  return fails!=0;
}
